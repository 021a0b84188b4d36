//! Every file keyward reads by a configured path (the config, the key file, TLS
//! certificates, keys and CA bundles) is opened here: a regular file of bounded size, or an
//! error. A FIFO, a device (`/dev/zero`) or a socket put at such a path would block a read,
//! or never end one, and with it a watcher, `keyward check` or shutdown; a huge file would
//! take the memory of the pod.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Open `path` if it is a regular file of at most `max` bytes: checked before opening and
/// again on what was opened (the path may have been swapped in between). It is opened
/// non-blocking, so a FIFO swapped in meanwhile does not block the open, and a file that
/// says it is regular but has nothing to give yet (`/proc/kmsg`) fails the read instead of
/// blocking it.
pub fn open(path: &Path, max: u64) -> io::Result<File> {
    let check = |meta: std::fs::Metadata| {
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        if meta.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {max} bytes"),
            ));
        }
        Ok(())
    };
    check(std::fs::metadata(path)?)?;
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?
    };
    check(file.metadata()?)?;
    Ok(file)
}

/// What `path` is, through symlinks, when it is there and is not a regular file (`"a
/// FIFO"`, `"a directory"`, ...); `None` for a regular file or a path that cannot be
/// looked at (not there yet, say).
pub fn other_kind(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path).ok()?.file_type();
    if kind.is_file() {
        return None;
    }
    Some(if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    })
}

/// The whole of `path`, a regular file of at most `max` bytes (one that grows past it while
/// being read is refused too).
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path, max)?.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_bounded_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        for path in [fifo.as_path(), dir.path(), Path::new("/dev/zero")] {
            let e = read(path, 1024).unwrap_err();
            assert_eq!(e.to_string(), "not a regular file", "{}", path.display());
        }
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 2048]).unwrap();
        assert!(read(&big, 1024)
            .unwrap_err()
            .to_string()
            .contains("larger than 1024"));
        assert_eq!(read(&big, 2048).unwrap().len(), 2048);
    }

    /// procfs files say they are regular and empty; one with nothing to read yet fails
    /// the read rather than blocking it (`/proc/kmsg` needs root to open; skipped without).
    #[test]
    fn a_proc_file_that_would_block_fails_instead() {
        let kmsg = Path::new("/proc/kmsg");
        if std::fs::File::open(kmsg).is_err() {
            return;
        }
        let done = std::sync::mpsc::channel();
        let tx = done.0;
        std::thread::spawn(move || {
            let _ = tx.send(read(kmsg, 1024).map(|b| b.len()));
        });
        let got = done.1.recv_timeout(std::time::Duration::from_secs(5));
        assert!(got.is_ok(), "the read blocked");
    }
}
