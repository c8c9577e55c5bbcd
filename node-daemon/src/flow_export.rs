//! The exported flow journal (`moatctl flows export`), read back by `moatctl policy check
//! --journal` and `moatctl flows --graph --journal` without a node.
//!
//! Format: JSON lines, one [`FlowRecord`] object per line (the fields of `moatctl flows -o
//! json`), oldest first. The journal's own files (`flows.<n>.jsonl` in moatd's state dir)
//! are the same records with a leading `"seq"` field, so they can be read directly too.
//! Unknown fields are ignored; blank lines are skipped.

use std::io::{BufRead, Write};

use crate::api::FlowRecord;

/// Writes the records, one JSON object per line.
pub fn write(out: &mut impl Write, records: &[FlowRecord]) -> std::io::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads an exported file. A line that is not a flow record is an error naming the line: a
/// check run on a damaged export must not pass because its flows went missing.
pub fn read(input: impl BufRead) -> Result<Vec<FlowRecord>, String> {
    let mut records = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line)
            .map_err(|e| format!("line {}: not a flow record: {e}", n + 1))?;
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOURNAL_LINE: &str = r#"{"seq":7,"time_ms":1700000000000,"verdict":"dropped","reason":"default-deny","direction":"ingress","mode":"enforce","protocol":"TCP","source":"10.0.0.1","destination":"10.0.0.2","source_port":1,"destination_port":80,"endpoint":"prod/web","peer":"prod/client","local_identity":300,"remote_identity":301,"rule_id":0,"rule":"default deny","bytes":60}"#;

    #[test]
    fn export_round_trips_and_journal_lines_read_too() {
        let journal = read(JOURNAL_LINE.as_bytes()).unwrap();
        assert_eq!(journal.len(), 1);
        assert_eq!(journal[0].endpoint.as_deref(), Some("prod/web"));
        let mut text = Vec::new();
        write(&mut text, &journal).unwrap();
        assert_eq!(read(&text[..]).unwrap(), journal);
    }

    #[test]
    fn a_damaged_line_is_an_error_naming_it() {
        let text = format!("{JOURNAL_LINE}\n\n{{\"oops\":1}}\n");
        let err = read(text.as_bytes()).unwrap_err();
        assert!(err.starts_with("line 3: not a flow record"), "{err}");
    }
}
