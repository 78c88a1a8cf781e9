//! The allocator settings both binaries start with.

/// With glibc, give freed memory back and keep one heap. Otherwise a peak's transient
/// allocations (list pages, request and response bodies, decisions) stay mapped after it, and
/// per-thread arenas raise the peak itself: the spoke agent idled at 22.4 MiB with glibc's
/// defaults against about 20 MiB with these, and the hub's fan-out peak falls with them too
/// (docs/benchmarks.md). musl's allocator needs nothing. Call it first thing in `main`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn frugal_malloc() {
    // SAFETY: mallopt only sets allocator parameters; it is called once, before any other
    // thread exists, with constants glibc documents for it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
}

/// Nothing to set outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn frugal_malloc() {}
