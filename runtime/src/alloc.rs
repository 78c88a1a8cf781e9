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

/// Give the free memory inside the heap back to the system (glibc's `malloc_trim`): trimming
/// at the top alone leaves the pages of a peak's freed allocations mapped when something
/// lives above them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free() {
    // SAFETY: malloc_trim only returns free pages to the system; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Nothing to release outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free() {}

/// CPU time this process used so far (user and system).
fn cpu_time() -> std::time::Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage struct into the pointer it is given.
    #[allow(unsafe_code)]
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec.max(0) as u64)
            + std::time::Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Every `every`, look at the CPU the process used; once a busy stretch (more than 1% of a
/// core) is followed by a quiet `every`, [`release_free`] once. An idle process only wakes to
/// read its CPU time; the memory a burst of work left behind goes back when it is over.
pub async fn release_free_when_quiet(every: std::time::Duration) {
    let mut last = cpu_time();
    let mut busy = false;
    loop {
        tokio::time::sleep(every).await;
        let now = cpu_time();
        let used = now.saturating_sub(last);
        last = now;
        if used > every / 100 {
            busy = true;
        } else if busy {
            release_free();
            busy = false;
            tracing::debug!("quiet after work: free heap memory released");
        }
    }
}
