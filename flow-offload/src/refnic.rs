//! refnic
