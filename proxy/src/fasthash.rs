//! A small, fast hasher for the request path's own maps (upstream pool by backend address,
//! metric handles by label identity). std's SipHash resists collision attacks on keys an
//! attacker picks; these keys come from the config (backend addresses, compiled label
//! values), and SipHash on them was several percent of the instructions per request.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Folded 64×64→128-bit multiplication per machine word (wyhash's mixing step); a byte
/// string goes in eight bytes at a time, its tail packed into one word with its length.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const K: u64 = 0xa076_1d64_78bd_642f;

fn mix(h: u64, w: u64) -> u64 {
    let r = u128::from(h ^ w).wrapping_mul(u128::from(K));
    (r as u64) ^ ((r >> 64) as u64)
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = mix(self.0, u64::from_le_bytes(w));
        }
        let tail = chunks.remainder();
        let mut w = [0u8; 8];
        w[..tail.len()].copy_from_slice(tail);
        w[7] = tail.len() as u8 | 0x80;
        self.0 = mix(self.0, u64::from_le_bytes(w));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0, n);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn equal_keys_hash_equal_and_near_keys_differ() {
        let b = BuildHasherDefault::<FastHasher>::default();
        assert_eq!(b.hash_one("10.0.0.1:8080"), b.hash_one("10.0.0.1:8080"));
        let addrs: std::collections::HashSet<u64> = (0..1000)
            .map(|i| b.hash_one(format!("10.0.{}.{}:8080", i / 256, i % 256)))
            .collect();
        assert_eq!(
            addrs.len(),
            1000,
            "no collisions among 1,000 nearby addresses"
        );
        assert_ne!(b.hash_one((1usize, 2usize)), b.hash_one((2usize, 1usize)));
    }

    #[test]
    fn a_map_works() {
        let mut m = FastMap::default();
        m.insert("a".to_string(), 1);
        m.insert("b".to_string(), 2);
        assert_eq!(m.get("a"), Some(&1));
        assert_eq!(m.get("b"), Some(&2));
        assert_eq!(m.get("c"), None);
    }
}
