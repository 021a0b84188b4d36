//! A chunked response body (RFC 9112 §7.1), decoded from the connection's read buffer with
//! the same rules and limits as hyper's decoder: CRLF line ends, at most 16 KiB of chunk
//! extensions and of trailers, at most 100 trailer lines.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::codec::MAX_HEADERS;
use super::H1Error;

const EXTENSIONS_LIMIT: u64 = 16 * 1024;
const TRAILERS_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
    End,
}

/// What the buffer yielded.
#[derive(Debug)]
pub enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The last chunk and its blank line are read: nothing of the body is left.
    End,
    /// The buffer holds no more of the body.
    NeedMore,
}

/// The decoder's position in a chunked body.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    size: u64,
    extensions: u64,
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            state: State::Start,
            size: 0,
            extensions: 0,
            trailers: None,
            trailer_lines: 0,
        }
    }
}

fn bad(why: &'static str) -> H1Error {
    H1Error::Chunked(why)
}

fn hex(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

impl Decoder {
    /// Consume what `buf` holds of the body, up to the next data, trailers or end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            if self.state == State::End {
                return Ok(Step::End);
            }
            if self.state == State::Data {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = usize::try_from(self.size).map_or(buf.len(), |s| s.min(buf.len()));
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Step::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Step::NeedMore);
            };
            buf.advance(1);
            if let Some(trailers) = self.byte(b)? {
                return Ok(trailers);
            }
        }
    }

    /// One byte of a size line, a chunk's end or the trailers. `Some` once the body ends.
    fn byte(&mut self, b: u8) -> Result<Option<Step>, H1Error> {
        use State::*;
        self.state = match (self.state, b) {
            (Start, _) => {
                self.size = hex(b).ok_or(bad("missing chunk size digit"))?;
                Size
            }
            (Size, _) if hex(b).is_some() => {
                let digit = hex(b).unwrap_or(0);
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(bad("chunk size overflows"))?;
                Size
            }
            (Size | SizeLws, b'\t' | b' ') => SizeLws,
            (Size | SizeLws, b';') => Extension,
            (Size | SizeLws, b'\r') => SizeLf,
            (Size | SizeLws, _) => return Err(bad("invalid chunk size line")),
            (Extension, b'\r') => SizeLf,
            (Extension, b'\n') => return Err(bad("chunk extension contains a newline")),
            (Extension, _) => {
                self.extensions += 1;
                if self.extensions >= EXTENSIONS_LIMIT {
                    return Err(bad("chunk extensions over the limit"));
                }
                Extension
            }
            (SizeLf, b'\n') if self.size == 0 => EndCr,
            (SizeLf, b'\n') => Data,
            (SizeLf, _) => return Err(bad("chunk size line without LF")),
            (DataCr, b'\r') => DataLf,
            (DataCr, _) => return Err(bad("chunk data without CR")),
            (DataLf, b'\n') => Start,
            (DataLf, _) => return Err(bad("chunk data without LF")),
            (Trailer, _) => {
                self.push_trailer(b)?;
                if b == b'\r' {
                    TrailerLf
                } else {
                    Trailer
                }
            }
            (TrailerLf, b'\n') => {
                if self.trailer_lines >= MAX_HEADERS {
                    return Err(bad("too many trailers"));
                }
                self.trailer_lines += 1;
                self.push_trailer(b)?;
                EndCr
            }
            (TrailerLf, _) => return Err(bad("trailer line without LF")),
            (EndCr, b'\r') => {
                if self.trailers.is_some() {
                    self.push_trailer(b)?;
                }
                EndLf
            }
            (EndCr, _) => {
                match &mut self.trailers {
                    None => {
                        let mut t = BytesMut::with_capacity(64);
                        t.extend_from_slice(&[b]);
                        self.trailers = Some(t);
                    }
                    Some(_) => self.push_trailer(b)?,
                }
                Trailer
            }
            (EndLf, b'\n') => {
                if self.trailers.is_some() {
                    self.push_trailer(b)?;
                }
                self.state = End;
                return match self.trailers.take() {
                    Some(t) => Ok(Some(Step::Trailers(trailers(&t, self.trailer_lines)?))),
                    None => Ok(Some(Step::End)),
                };
            }
            (EndLf, _) => return Err(bad("last chunk without LF")),
            // `decode` handles both before reading a byte.
            (Data | End, _) => return Err(bad("decoder state")),
        };
        Ok(None)
    }

    fn push_trailer(&mut self, b: u8) -> Result<(), H1Error> {
        let t = self.trailers.get_or_insert_with(BytesMut::new);
        t.extend_from_slice(&[b]);
        if t.len() >= TRAILERS_LIMIT {
            return Err(bad("trailers over the limit"));
        }
        Ok(())
    }
}

/// The trailer section as headers.
fn trailers(buf: &[u8], lines: usize) -> Result<HeaderMap, H1Error> {
    let mut slots = vec![httparse::EMPTY_HEADER; lines];
    match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((_, parsed))) => {
            let mut map = HeaderMap::with_capacity(parsed.len());
            for h in parsed {
                let name = HeaderName::try_from(h.name).map_err(|_| H1Error::Trailers)?;
                let value = HeaderValue::from_bytes(h.value).map_err(|_| H1Error::Trailers)?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(H1Error::Trailers),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `input` in pieces of `piece` bytes; collect the data and trailers.
    fn decode(input: &[u8], piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut rest = input;
        loop {
            match dec.decode(&mut buf)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::Trailers(t) => {
                    trailers = Some(t);
                    return Ok((data, trailers));
                }
                Step::End => return Ok((data, trailers)),
                Step::NeedMore if rest.is_empty() => return Err(H1Error::Incomplete),
                Step::NeedMore => {
                    let n = piece.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    #[test]
    fn chunks_decode_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n6;name=v\r\n world\r\nA \r\n0123456789\r\n0\r\n\r\n";
        for piece in [1, 2, 3, 7, 64] {
            let (data, trailers) = decode(body, piece).unwrap();
            assert_eq!(data, b"hello world0123456789", "pieces of {piece}");
            assert!(trailers.is_none());
        }
    }

    #[test]
    fn trailers_are_returned() {
        let (data, trailers) = decode(b"2\r\nok\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\n", 4).unwrap();
        assert_eq!(data, b"ok");
        let t = trailers.unwrap();
        assert_eq!(
            (t["x-t"].as_bytes(), t["x-u"].as_bytes()),
            (&b"1"[..], &b"2"[..])
        );
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"1 2\r\nx\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(
                matches!(decode(bad, 3), Err(H1Error::Chunked(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_extension = format!(
            "1;{}\r\nx\r\n0\r\n\r\n",
            "e".repeat(EXTENSIONS_LIMIT as usize)
        );
        assert!(decode(long_extension.as_bytes(), 1024).is_err());
    }
}
