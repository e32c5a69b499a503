//! Length-prefixed framing, sync and async. A frame larger than 1 MiB is refused before any
//! of its body is read, so a hostile length prefix cannot make the agent allocate.

use std::io::{self, Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame body accepted in either direction.
pub const MAX_FRAME: usize = 1024 * 1024;

#[derive(Debug)]
pub enum FrameError {
    /// The peer announced a frame above [`MAX_FRAME`].
    TooLarge(usize),
    /// The connection ended in the middle of a frame.
    Truncated,
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => {
                write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
            }
            FrameError::Truncated => f.write_str("connection closed in the middle of a frame"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Prefix `body` with its length.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    encode_into(&mut out, body);
    out
}

/// Append the frame of `body` to `out` (batching several answers into one write).
pub fn encode_into(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// The body length a 4-byte prefix announces, refused above [`MAX_FRAME`] before any body
/// byte is read or allocated.
pub fn announced_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_FRAME {
        Err(FrameError::TooLarge(n))
    } else {
        Ok(n)
    }
}

/// What a buffer of received bytes holds at its start.
#[derive(Debug, PartialEq, Eq)]
pub enum Buffered {
    /// A whole frame with a body of this length (the frame is `4 + len` bytes).
    Complete(usize),
    /// More bytes are needed.
    Partial,
    /// The announced length is over the limit.
    TooLarge(usize),
}

/// Inspect the start of `buf` (used by readers that buffer several pipelined frames).
pub fn buffered(buf: &[u8]) -> Buffered {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Buffered::Partial;
    };
    match announced_len([a, b, c, d]) {
        Err(_) => Buffered::TooLarge(u32::from_be_bytes([a, b, c, d]) as usize),
        Ok(n) if buf.len() >= 4 + n => Buffered::Complete(n),
        Ok(_) => Buffered::Partial,
    }
}

/// Read one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_async<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let mut body = vec![0u8; announced_len(len)?];
    r.read_exact(&mut body).await.map_err(body_error)?;
    Ok(Some(body))
}

/// Blocking counterpart of [`read_async`].
pub fn read_sync<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let mut body = vec![0u8; announced_len(len)?];
    r.read_exact(&mut body).map_err(body_error)?;
    Ok(Some(body))
}

fn body_error(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Truncated
    } else {
        FrameError::Io(e)
    }
}

pub fn write_sync<W: Write>(w: &mut W, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    w.write_all(&encode(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let f = encode(b"{\"op\":\"status\"}");
        assert_eq!(
            read_sync(&mut &f[..]).unwrap().unwrap(),
            b"{\"op\":\"status\"}"
        );
        assert!(read_sync(&mut &[][..]).unwrap().is_none());
        assert!(matches!(
            read_sync(&mut &f[..3]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_sync(&mut &f[..7]),
            Err(FrameError::Truncated)
        ));
        let huge = (2u32 * 1024 * 1024).to_be_bytes();
        assert!(matches!(
            read_sync(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
    }
}
