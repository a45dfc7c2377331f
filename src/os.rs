//! What the operating system says about this process: memory high-water mark, preemptions.

/// Peak resident set size (VmHWM) in bytes; 0 when /proc cannot tell.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Involuntary context switches of the calling thread so far: how often another thread took its
/// core while it could have run. Compute preempted often on a shared machine runs slower.
pub fn thread_preemptions() -> u64 {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_nivcsw).unwrap_or(0)
}

static STOP_SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_stop_signal(_: libc::c_int) {
    STOP_SIGNALLED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into a flag that a loop polls (for a process that must finish its
/// work, e.g. close a file properly, instead of dying on the signal).
pub fn stop_on_signals() -> &'static std::sync::atomic::AtomicBool {
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, note_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGTERM, note_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    &STOP_SIGNALLED
}
