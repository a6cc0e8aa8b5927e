//! A record's payload as the appender hands it over: byte strings that are written back to back.
//!
//! A replicated block write reaches the WAL as an entry header, op headers and the block data,
//! and the data is the same reference-counted buffer the device pinned in its cache and Raft
//! holds in its log cache and sends to followers. Keeping it in parts means the WAL's queue
//! holds another reference instead of another copy; the writer thread joins the parts only
//! while it encodes the record (one record at a time).

use std::borrow::Cow;

use bytes::Bytes;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    parts: Vec<Bytes>,
    len: usize,
}

impl Payload {
    /// The parts, written in this order.
    pub fn from_parts(parts: Vec<Bytes>) -> Payload {
        let len = parts.iter().map(Bytes::len).sum();
        Payload { parts, len }
    }

    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload in one piece: borrowed when it is one part, joined otherwise.
    pub fn contiguous(&self) -> Cow<'_, [u8]> {
        match self.parts.as_slice() {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(one),
            parts => Cow::Owned(parts.concat()),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.contiguous().into_owned()
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::from_parts(vec![Bytes::from(v)])
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        Payload::from_parts(vec![b])
    }
}

impl From<&[u8]> for Payload {
    fn from(b: &[u8]) -> Payload {
        Payload::from(Bytes::copy_from_slice(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_join_in_order() {
        let p = Payload::from_parts(vec![
            Bytes::from_static(b"head"),
            Bytes::new(),
            Bytes::from(vec![1, 2, 3]),
        ]);
        assert_eq!(p.len(), 7);
        assert_eq!(p.to_vec(), b"head\x01\x02\x03");
        assert!(matches!(p.contiguous(), Cow::Owned(_)));
        let one = Payload::from(vec![9u8; 5]);
        assert!(matches!(one.contiguous(), Cow::Borrowed(b) if b == [9u8; 5]));
        assert!(Payload::default().is_empty());
        assert_eq!(Payload::default().contiguous().len(), 0);
    }
}
