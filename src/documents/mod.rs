//! The documents view (`--view documents`): the attachments of DocumentReference and
//! DiagnosticReport as files, one folder per subject.
//!
//! - [`names`]: the folder and file names, cleaned, unique and stable.

// Used by the view's source (next commits); its tests run meanwhile.
#[cfg_attr(not(test), allow(dead_code))]
pub mod names;
