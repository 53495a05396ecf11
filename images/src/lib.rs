//! DPU images: a payload plus a signed manifest of chunk hashes, and the A/B slots they are
//! flashed into.
#![forbid(unsafe_code)]
