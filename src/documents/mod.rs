//! The documents view (`--view documents`): the attachments of DocumentReference and
//! DiagnosticReport as files, one folder per subject.
//!
//! - [`names`]: the folder and file names, cleaned, unique and stable;
//! - [`source`]: `DocumentsSource`, the view as a `Source` of the core: listing, fetching an
//!   attachment's url (the token only for the base URL's origin), hash checks, xattrs.

pub mod names;
pub mod source;
