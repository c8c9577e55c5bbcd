//! The bounded YAML reader behind the local datastore, moatctl and the policy parsers
//! (`moat_policy::yaml::documents`) on any text.
//!
//! Properties: nothing panics, overflows the stack or runs away (libfuzzer's -timeout and
//! -rss_limit_mb catch the latter two: anchors and aliases must not expand without bound);
//! the result stays inside the reader's documented budgets (documents, nodes, depth); an
//! error is one line, since it becomes one rejection line.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_policy::yaml::{MAX_DEPTH, MAX_DOCUMENTS, MAX_NODES, YamlError, documents};
use serde_json::Value;

/// Nodes and depth of a value, with an explicit stack: the check itself must not recurse.
fn measure(values: &[Value]) -> (usize, usize) {
    let mut stack: Vec<(&Value, usize)> = values.iter().map(|v| (v, 1)).collect();
    let (mut nodes, mut depth) = (0, 0);
    while let Some((value, d)) = stack.pop() {
        nodes += 1;
        depth = depth.max(d);
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, d + 1))),
            _ => {}
        }
    }
    (nodes, depth)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match documents(text) {
        Ok(docs) => {
            assert!(docs.len() <= MAX_DOCUMENTS);
            // Every document but the first needs a `---` or follows a `...`.
            assert!(docs.len() <= text.matches("---").count() + text.matches("...").count() + 1);
            let (nodes, depth) = measure(&docs);
            assert!(nodes <= MAX_NODES, "{nodes} nodes");
            // Keys are nodes of their own in YAML but not in the JSON value: depth as YAML
            // counts it, plus one for the document level.
            assert!(depth <= MAX_DEPTH + 1, "depth {depth}");
        }
        Err(YamlError::Syntax(message)) => {
            assert!(!message.contains('\n'), "{message:?}");
        }
        Err(YamlError::TooLarge { size }) => assert_eq!(size, text.len()),
    }
});
