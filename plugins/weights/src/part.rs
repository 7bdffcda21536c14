//! The statistics one pass over some of a model's files leaves behind, in a
//! form that survives JSON exactly, so passes over separate shards can be
//! joined into the verdict a single pass over the whole model gives.
//!
//! This is the map half of splitting a sharded model over workers
//! (docs/scale-out.md, "Not done yet"): a per-shard scan cannot decide alone,
//! because the robust z-scores compare each tensor with the same role in every
//! other layer, wherever those layers are stored.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::TensorStats;

/// A finding made while reading, before any comparison across tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Noted {
    pub rule: String,
    pub message: String,
    pub location: String,
    pub offset: Option<u64>,
}

/// Everything the verdict needs from the files one pass read.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartStats {
    /// Analysed tensors, in file order then header order.
    pub tensors: Vec<TensorStats>,
    /// Critical findings that fail the model whatever the score (NaN/Inf, bad structure).
    pub gates: Vec<Noted>,
    /// Tensors of types that are not analysed.
    pub notes: Vec<Noted>,
    /// Bytes of the analysed tensors.
    pub bytes: u64,
    /// Milliseconds spent per tensor type.
    pub ms_by_type: BTreeMap<String, f64>,
}

impl PartStats {
    /// The parts in order, as one pass over all their files would have left them.
    pub fn join(parts: Vec<PartStats>) -> PartStats {
        let mut all = PartStats::default();
        for p in parts {
            all.tensors.extend(p.tensors);
            all.gates.extend(p.gates);
            all.notes.extend(p.notes);
            all.bytes += p.bytes;
            for (k, ms) in p.ms_by_type {
                *all.ms_by_type.entry(k).or_default() += ms;
            }
        }
        all
    }
}

/// A 256-bucket histogram written as `[[bucket, count], ...]` for its
/// non-empty buckets: a tensor's histograms hold a few dozen, so a part with
/// hundreds of tensors stays well inside the host's report cap.
pub(crate) mod sparse_hist {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: Copy + Default + PartialEq + serde::Serialize>(
        hist: &[T; 256],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let zero = T::default();
        s.collect_seq(hist.iter().enumerate().filter(|(_, c)| **c != zero).map(|(i, c)| (i as u8, *c)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Copy + Default + PartialEq + Deserialize<'de>>(
        d: D,
    ) -> Result<[T; 256], D::Error> {
        let pairs: Vec<(u8, T)> = Vec::deserialize(d)?;
        let mut hist = [T::default(); 256];
        let mut last: Option<u8> = None;
        for (i, c) in pairs {
            // Strictly rising buckets: a repeated bucket would be a second, conflicting count.
            if last.is_some_and(|l| i <= l) {
                return Err(D::Error::custom(format!("histogram bucket {i} is out of order or repeated")));
            }
            last = Some(i);
            hist[i as usize] = c;
        }
        Ok(hist)
    }

    /// The same for a boxed histogram.
    pub mod boxed {
        use serde::{Deserializer, Serializer};

        pub fn serialize<S: Serializer>(hist: &[u64; 256], s: S) -> Result<S::Ok, S::Error> {
            super::serialize(hist, s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<[u64; 256]>, D::Error> {
            super::deserialize(d).map(Box::new)
        }
    }
}
