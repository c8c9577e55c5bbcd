//! The local datastore's file parser (`moatd::local::parse_text`) on any text: what a file in
//! the datastore directory may hold, written by anyone with access to it.
//!
//! Properties: nothing panics; a text that is not YAML is one rejection and no objects (the
//! file's previous objects stay in force, so a partial read would silently replace them);
//! otherwise at most one rejection, one object and one failed key per document, so a broken
//! file can never flood the rejection list (the reader once reported the same syntax error in
//! a loop); every rejection line starts with the file's label, which is how an operator finds
//! the file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moatd::local::parse_text;

const LABEL: &str = "fuzz/objects.yaml";

/// Every document but the first needs a `---` or a preceding `...`, so this bounds the number
/// of documents the text can hold, independently of what the parser says.
fn document_bound(text: &str) -> usize {
    text.matches("---").count() + text.matches("...").count() + 1
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_text(LABEL, text);
    let prefix = format!("{LABEL}: ");
    for line in &parsed.rejected {
        assert!(line.starts_with(&prefix), "{line:?}");
    }
    let bound = document_bound(text);
    assert!(
        parsed.rejected.len() <= bound + 2,
        "{} rejections for at most {bound} documents",
        parsed.rejected.len()
    );
    match moat_policy::yaml::documents(text) {
        Err(_) => {
            assert!(parsed.unreadable);
            assert_eq!(parsed.rejected.len(), 1, "{:?}", parsed.rejected);
        }
        Ok(documents) => {
            assert!(!parsed.unreadable);
            assert!(documents.len() <= bound);
            assert!(parsed.rejected.len() <= documents.len());
            assert!(parsed.objects.len() <= documents.len());
            assert!(parsed.failed.len() <= documents.len());
        }
    }
    if parsed.unreadable {
        assert!(parsed.objects.is_empty());
        assert!(parsed.failed.is_empty());
    }
});
