//! Every file keyward reads by a configured path (the config, the key file, TLS
//! certificates, keys and CA bundles) is opened here: a regular file of bounded size, or an
//! error. A FIFO, a device (`/dev/zero`) or a socket put at such a path would block a read,
//! or never end one, and with it a watcher, `keyward check` or shutdown; a huge file would
//! take the memory of the pod.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// Open `path` if it is a regular file of at most `max` bytes: checked before opening
/// (opening a FIFO blocks) and again on what was opened (the path may have been swapped).
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
    let file = File::open(path)?;
    check(file.metadata()?)?;
    Ok(file)
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
}
