//! The `keywatch` binary: everything lives in the library; this only hands over the arguments.

/// mimalloc rather than glibc's allocator: the service allocates and frees per record on several
/// threads (tokio workers, SQLite, librdkafka), where glibc spent a tenth of the processing thread
/// in `malloc_consolidate` and kept freed arenas resident (see bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // The C libraries (librdkafka, SQLite) still use glibc's malloc, which by default keeps up to
    // 8 arenas per core, each holding on to freed memory; two are plenty for their threads.
    // glibc's mmap threshold is left dynamic: after the first of librdkafka's fetch responses
    // (up to fetch.max.bytes, 4 MiB) is freed, the threshold rises to its size and the next ones
    // reuse arena memory. A fixed 256 KiB threshold (until 2026-11-29) gave every response a
    // fresh mapping: ~290,000 page faults per 1M records, 0.45 s of CPU in librdkafka's broker
    // thread, for ~3-11 MiB less peak RSS (bench/service).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
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
