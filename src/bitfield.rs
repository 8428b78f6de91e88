//! A fixed-length set of piece indices, stored MSB-first as on the wire and in sled.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitfield {
    bits: Vec<u8>,
    len: u32,
    count: u32,
}

impl Bitfield {
    pub fn new(len: u32) -> Bitfield {
        Bitfield {
            bits: vec![0; (len as usize).div_ceil(8)],
            len,
            count: 0,
        }
    }

    pub fn full(len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// Rebuild from bytes; `None` when the byte length does not fit `len` or a spare bit is set.
    pub fn from_bytes(bytes: &[u8], len: u32) -> Option<Bitfield> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let spare = (bytes.len() * 8) as u32 - len;
        if spare > 0 && bytes.last().is_some_and(|b| b & ((1u8 << spare) - 1) != 0) {
            return None;
        }
        let count = bytes.iter().map(|b| b.count_ones()).sum();
        Some(Bitfield {
            bits: bytes.to_vec(),
            len,
            count,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.len
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
    }

    /// Set bit `i`; returns whether it changed.
    pub fn set(&mut self, i: u32) -> bool {
        assert!(i < self.len, "bit {i} out of range {}", self.len);
        let (byte, mask) = ((i / 8) as usize, 0x80u8 >> (i % 8));
        let was = self.bits[byte] & mask != 0;
        self.bits[byte] |= mask;
        if !was {
            self.count += 1;
        }
        !was
    }

    /// Clear bit `i`; returns whether it changed.
    pub fn clear(&mut self, i: u32) -> bool {
        assert!(i < self.len, "bit {i} out of range {}", self.len);
        let (byte, mask) = ((i / 8) as usize, 0x80u8 >> (i % 8));
        let was = self.bits[byte] & mask != 0;
        self.bits[byte] &= !mask;
        if was {
            self.count -= 1;
        }
        was
    }

    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_refuse_wrong_lengths_and_spare_bits() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        assert_eq!(b.count(), 2);
        let again = Bitfield::from_bytes(b.as_bytes(), 10).unwrap();
        assert_eq!(again, b);
        assert!(Bitfield::from_bytes(b.as_bytes(), 17).is_none());
        assert!(Bitfield::from_bytes(&[0, 0x01], 10).is_none());
        assert!(b.clear(0));
        assert!(!b.clear(0));
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![9]);
    }
}
