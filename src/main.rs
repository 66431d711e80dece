//! The `keywatch` binary: everything lives in the library; this only hands over the arguments.

/// mimalloc rather than glibc's allocator: the service allocates and frees per record on several
/// threads (tokio workers, SQLite, librdkafka), where glibc spent a tenth of the processing thread
/// in `malloc_consolidate` and kept freed arenas resident (see bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // The C libraries (librdkafka, SQLite) still use glibc's malloc, which by default keeps up to
    // 8 arenas per core, each holding on to freed memory; two are plenty for their threads.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    std::process::exit(keywatch::cli::main_with_args(std::env::args_os().collect()));
}
