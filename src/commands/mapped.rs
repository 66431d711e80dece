//! Reading a large regular file through a sliding memory map instead of `read(2)`.
//!
//! `read` copies every byte from the page cache into the reader's buffer; on a 1 GB replay input
//! that copy was about 8% of the run. A [`MappedReader`] maps the file one window at a time
//! (`MAP_POPULATE`, so a window costs one system call and no page faults) and hands out the
//! mapped bytes as its `BufRead` buffer. Only one window is mapped at any time, so the resident
//! memory stays one window (4 MiB) whatever the size of the file.
//!
//! The file is read up to the size it has when the reader reaches it, like `read`: a file that
//! grows while it is replayed is read to its new end. A file that is truncated while it is mapped
//! makes the kernel raise SIGBUS on the lost pages; `replay` inputs are closed log files, and the
//! read path (`-` for stdin, or a pipe) is there for anything that may change underneath.
//! Where the file cannot be mapped (a filesystem without mmap support), the reader falls back to
//! `read` from the same position.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

/// Bytes mapped at a time: a multiple of every page size in use (4 KiB, 16 KiB, 64 KiB, 2 MiB).
const WINDOW: u64 = 4 << 20;

pub struct MappedReader {
    file: File,
    /// File offset where reading continues once the current window is used up.
    next: u64,
    /// File offset of the current window's first byte (a multiple of `WINDOW`).
    base: u64,
    /// The mapped window, `len` bytes at `ptr`; `len == 0` when nothing is mapped.
    ptr: *const u8,
    len: usize,
    /// Bytes of the window already consumed.
    pos: usize,
    /// Set once mapping failed: plain reads from then on.
    fallback: Option<BufReader<File>>,
}

// SAFETY: the mapping is private to this reader and only read through `&self`/`&mut self`.
unsafe impl Send for MappedReader {}

impl MappedReader {
    pub fn new(file: File) -> MappedReader {
        MappedReader {
            file,
            next: 0,
            base: 0,
            ptr: std::ptr::null(),
            len: 0,
            pos: 0,
            fallback: None,
        }
    }

    fn unmap(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are exactly what mmap returned; no borrow of the window can be
            // alive here because every caller holds `&mut self`.
            unsafe {
                libc::munmap(self.ptr as *mut libc::c_void, self.len);
            }
            self.ptr = std::ptr::null();
            self.len = 0;
            self.pos = 0;
        }
    }

    /// Maps the window holding `self.next`; `Ok(false)` at the end of the file.
    fn map_next(&mut self) -> io::Result<bool> {
        let size = self.file.metadata()?.len();
        if self.next >= size {
            return Ok(false);
        }
        // Mappings start at a page boundary; after a short last window the next read may not.
        let base = self.next - self.next % WINDOW;
        let len = (size - base).min(WINDOW) as usize;
        // SAFETY: a fresh read-only private mapping of `len` bytes of our own file descriptor at a
        // page-aligned offset; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                self.file.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            tracing::debug!(error = %err, "mmap failed; reading the rest of the file instead");
            let mut file = self.file.try_clone()?;
            file.seek(SeekFrom::Start(self.next))?;
            self.fallback = Some(BufReader::with_capacity(1 << 20, file));
            return Ok(true);
        }
        self.ptr = ptr as *const u8;
        self.base = base;
        self.len = len;
        self.pos = (self.next - base) as usize;
        Ok(true)
    }
}

impl Drop for MappedReader {
    fn drop(&mut self) {
        self.unmap();
    }
}

impl Read for MappedReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for MappedReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.fallback.is_none() && self.pos >= self.len {
            if self.len > 0 {
                self.next = self.base + self.len as u64;
                self.unmap();
            }
            if !self.map_next()? {
                return Ok(&[]);
            }
        }
        if let Some(r) = &mut self.fallback {
            return r.fill_buf();
        }
        // SAFETY: `ptr` maps `len` readable bytes until the next `unmap`, which needs `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(self.pos), self.len - self.pos) })
    }

    fn consume(&mut self, amt: usize) {
        match &mut self.fallback {
            Some(r) => r.consume(amt),
            None => self.pos = (self.pos + amt).min(self.len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read_all(r: &mut dyn BufRead) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let buf = r.fill_buf().unwrap();
            if buf.is_empty() {
                return out;
            }
            // Consume in odd-sized steps so that window edges fall inside a step.
            let n = buf.len().min(1_000_003);
            out.extend_from_slice(&buf[..n]);
            r.consume(n);
        }
    }

    #[test]
    fn reads_every_byte_across_windows_and_sees_growth() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(WINDOW as usize * 2 + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let mut r = MappedReader::new(f.try_clone().unwrap());
        assert_eq!(read_all(&mut r), data);
        // Appended after the end was reached: read like `read` would.
        f.write_all(b"more").unwrap();
        assert_eq!(read_all(&mut r), b"more");
    }

    #[test]
    fn empty_file_is_empty() {
        let f = tempfile::tempfile().unwrap();
        let mut r = MappedReader::new(f);
        assert!(read_all(&mut r).is_empty());
    }
}
