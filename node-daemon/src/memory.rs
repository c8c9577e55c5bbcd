//! moatd's memory ceiling against the C allocator's habits. glibc gives each thread that
//! allocates concurrently an arena of its own (up to eight per core) and keeps freed memory in
//! each; moatd serves API connections on short-lived threads, and a reload that parses a large
//! file on one of them would leave its high-water mark behind in another arena each time. Two
//! arenas bound that, and returning freed pages after a large parse keeps the resident size at
//! what moatd holds, not what it once parsed.

/// Limits the allocator to two arenas. Call once, first thing in `main`.
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap pages to the kernel (after a parse that allocated much and kept little).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
