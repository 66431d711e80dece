//! The `keywatch` binary: everything lives in the library; this only hands over the arguments.

/// mimalloc rather than glibc's allocator: the service allocates and frees per record on several
/// threads (tokio workers, SQLite, librdkafka), where glibc spent a tenth of the processing thread
/// in `malloc_consolidate` and kept freed arenas resident (see bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // The C libraries (librdkafka, SQLite) still use glibc's malloc, which by default keeps up to
    // 8 arenas per core, each holding on to freed memory; two are plenty for their threads. A
    // fixed mmap threshold keeps large buffers (librdkafka's fetch responses, up to
    // fetch.max.bytes) in mappings of their own that go back to the system when freed; glibc's
    // default threshold rises to the largest block freed, after which such buffers stay in the
    // arena (bench/service: about 20 MiB less resident).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
    // mimalloc asks for transparent huge pages (madvise), so its memory is resident in 2 MiB
    // steps: about 20 MiB more at the service's peak and a 2 MiB page clear on many first
    // touches. Small pages suit a process whose heap stays in the tens of MiB.
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    std::process::exit(keywatch::cli::main_with_args(std::env::args_os().collect()));
}
