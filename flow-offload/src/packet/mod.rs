//! Zero-copy packet views.
