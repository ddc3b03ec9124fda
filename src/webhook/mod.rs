//! Admission webhook (filled in later).
