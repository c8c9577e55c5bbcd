//! Reading YAML that anyone may have written: the local datastore's files, `moatctl`'s input,
//! policy documents. Every read is bounded (bytes, documents, nodes, depth, alias expansion)
//! and total: a syntax error ends the stream with one error, never a stream of repeated ones,
//! and nothing in the text can make the reader loop, recurse without end or allocate without
//! bound.
//!
//! serde_yaml is deprecated upstream; its successors were weighed in the README's dependency
//! notes. serde-saphyr is a pure-Rust parser whose budgets are made for untrusted input.

use serde_saphyr::{Budget, Options};

/// The largest YAML text read as one unit (a file of the local datastore, a policy). A
/// Kubernetes object is at most about 1.5 MiB in etcd; 2 MiB holds thousands of policies. The
/// parsed form of YAML costs up to about 35 times its text (measured: 4.5 MB of policies
/// peaked at 155 MiB as generic values), so this limit is what bounds a file's cost.
pub const MAX_TEXT_BYTES: usize = 2 << 20;

/// Documents in one text: more than a file of [`MAX_TEXT_BYTES`] holds in practice.
pub const MAX_DOCUMENTS: usize = 10_000;

/// Nesting depth: a NetworkPolicy nests about 10 levels; 64 is far above and far below any
/// stack limit.
pub const MAX_DEPTH: usize = 64;

/// Nodes (scalars, sequences, mappings) in one text, aliases expanded: what a full
/// [`MAX_TEXT_BYTES`] of policies holds, and the bound on an anchor/alias "billion laughs"
/// (measured: 49 MiB at the limit).
pub const MAX_NODES: usize = 250_000;

/// Aliases (`*name`) and anchors (`&name`) in one text. Kubernetes objects are written
/// without them (kubectl never emits them); a few are allowed for hand-written files. Each
/// alias replays its anchor's events, so these bound the work an alias bomb can ask for
/// before the node budget is reached (measured under the fuzzer: nine levels of nine aliases
/// cost 16 s of CPU at the reader's default of 50,000 aliases and a million replayed events).
pub const MAX_ALIASES: usize = 1_000;
pub const MAX_ANCHORS: usize = 1_000;
pub const MAX_REPLAYED_EVENTS: usize = 100_000;

/// Why a YAML text was not read: one line that says where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("{size} bytes is over the limit of {MAX_TEXT_BYTES} bytes")]
    TooLarge { size: usize },
    #[error("not YAML: {0}")]
    Syntax(String),
}

fn options() -> Options {
    let mut budget = Budget::default();
    budget.max_documents = MAX_DOCUMENTS;
    budget.max_depth = MAX_DEPTH;
    budget.max_nodes = MAX_NODES;
    budget.max_aliases = MAX_ALIASES;
    budget.max_anchors = MAX_ANCHORS;
    budget.max_recorded_anchor_events = MAX_REPLAYED_EVENTS;
    budget.max_reader_input_bytes = Some(MAX_TEXT_BYTES);
    let mut options = Options::default();
    options.budget = Some(budget);
    options
}

/// The first line of a parser error: where and what. The rest is a source excerpt, which a
/// rejection list (one line per file) does not want.
fn one_line(error: impl std::fmt::Display) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Every non-empty document of a YAML stream as a generic value, in order.
/// Either all documents or one error: after a syntax error nothing later in the stream can be
/// trusted to mean what its author meant.
pub fn documents(text: &str) -> Result<Vec<serde_json::Value>, YamlError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(YamlError::TooLarge { size: text.len() });
    }
    serde_saphyr::from_multiple_with_options(text, options())
        .map_err(|e| YamlError::Syntax(one_line(e)))
}

/// One value rendered as YAML (for output; never fails on a JSON-shaped value).
pub fn to_string<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // A reference is Sized and serializes as what it points to.
    serde_saphyr::to_string(&value)
        .unwrap_or_else(|e| format!("# not representable as YAML: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syntax_error_is_one_error_that_says_where() {
        let broken = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x\n  spec: [[[\n";
        let YamlError::Syntax(message) = documents(broken).unwrap_err() else {
            panic!("a syntax error")
        };
        assert!(message.starts_with("line 4 column"), "{message}");
        assert!(!message.contains('\n'));
    }

    #[test]
    fn documents_keep_their_order_and_empty_ones_are_skipped() {
        let docs = documents("a: 1\n---\n---\nb: [1, '2']\n").unwrap();
        assert_eq!(
            docs,
            vec![
                serde_json::json!({"a": 1}),
                serde_json::json!({"b": [1, "2"]})
            ]
        );
    }

    #[test]
    fn alias_bombs_deep_nesting_and_huge_texts_are_refused() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h"])
        {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        assert!(matches!(documents(&bomb), Err(YamlError::Syntax(_))));
        // The fuzzer's slow input: nine levels of nine aliases (9^9 nodes if expanded).
        let mut nine = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        for pair in names.windows(2) {
            let refs = vec![format!("*{}", pair[0]); 9].join(", ");
            nine.push_str(&format!("{}: &{} [{refs}]\n", pair[1], pair[1]));
        }
        assert!(matches!(documents(&nine), Err(YamlError::Syntax(_))));
        assert!(matches!(
            documents(&"[".repeat(100_000)),
            Err(YamlError::Syntax(_))
        ));
        let deep: String = (0..200)
            .map(|i| format!("{}a:\n", "  ".repeat(i)))
            .collect();
        assert!(matches!(documents(&deep), Err(YamlError::Syntax(_))));
        let huge = "#".repeat(MAX_TEXT_BYTES + 1);
        assert_eq!(
            documents(&huge),
            Err(YamlError::TooLarge {
                size: MAX_TEXT_BYTES + 1
            })
        );
    }
}
