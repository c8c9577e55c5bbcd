//! `moatctl flows --graph dot|mermaid`: the observed workload graph. Nodes are workloads
//! (see [`crate::workload`]) and reserved peers; an edge is a (from, to) workload pair with
//! the number of journal records per verdict. Pure: records in, text out.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{FlowRecord, Verdict};
use crate::workload::flow_ends;

/// Records of one workload pair, by verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeCounts {
    pub allowed: u64,
    pub denied: u64,
    /// Policy would have denied; audit or learn mode let it through.
    pub audit: u64,
}

impl EdgeCounts {
    fn label(&self) -> String {
        let mut parts = Vec::new();
        for (n, name) in [
            (self.allowed, "allowed"),
            (self.denied, "denied"),
            (self.audit, "audit-would-deny"),
        ] {
            if n > 0 {
                parts.push(format!("{name} {n}"));
            }
        }
        parts.join(", ")
    }

    /// The colour of the worst verdict on the edge: a denial is what a reader looks for.
    fn colour(&self) -> &'static str {
        if self.denied > 0 {
            "red"
        } else if self.audit > 0 {
            "orange"
        } else {
            "green"
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadGraph {
    pub nodes: BTreeSet<String>,
    pub edges: BTreeMap<(String, String), EdgeCounts>,
}

impl WorkloadGraph {
    pub fn from_records(records: &[FlowRecord]) -> Self {
        let mut graph = Self::default();
        for r in records {
            let (from, to) = flow_ends(r);
            graph.nodes.insert(from.clone());
            graph.nodes.insert(to.clone());
            let counts = graph.edges.entry((from, to)).or_default();
            match r.verdict {
                Verdict::Allowed => counts.allowed += 1,
                Verdict::Dropped => counts.denied += 1,
                Verdict::Audit => counts.audit += 1,
            }
        }
        graph
    }

    /// Graphviz DOT: node ids are the quoted workload names (escaped), so any name is valid.
    pub fn to_dot(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("digraph moat_flows {\n  rankdir=LR;\n  node [shape=box];\n");
        for n in &self.nodes {
            out.push_str(&format!("  {};\n", quote(n)));
        }
        for ((from, to), c) in &self.edges {
            out.push_str(&format!(
                "  {} -> {} [label={}, color={}];\n",
                quote(from),
                quote(to),
                quote(&c.label()),
                c.colour()
            ));
        }
        out.push_str("}\n");
        out
    }

    /// Mermaid flowchart: workload names carry `/`, dots and dashes, which Mermaid ids may
    /// not, so nodes get ids `n0`, `n1`, ... and the name as a quoted label.
    pub fn to_mermaid(&self) -> String {
        let ids: BTreeMap<&str, String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), format!("n{i}")))
            .collect();
        // Mermaid has no escape for `"` inside a label but accepts its entity code.
        let label = |s: &str| s.replace('"', "#quot;");
        let mut out = String::from("flowchart LR\n");
        for (name, id) in &ids {
            out.push_str(&format!("  {id}[\"{}\"]\n", label(name)));
        }
        for (i, ((from, to), c)) in self.edges.iter().enumerate() {
            out.push_str(&format!(
                "  {} -->|\"{}\"| {}\n",
                ids[from.as_str()],
                label(&c.label()),
                ids[to.as_str()]
            ));
            out.push_str(&format!("  linkStyle {i} stroke:{}\n", c.colour()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Direction, EndpointMode};

    pub(crate) fn record(
        direction: Direction,
        endpoint: &str,
        peer: &str,
        verdict: Verdict,
    ) -> FlowRecord {
        FlowRecord {
            time_ms: 1,
            verdict,
            reason: "policy-allow".into(),
            direction,
            mode: EndpointMode::Enforce,
            protocol: "TCP".into(),
            source: "10.0.0.1".into(),
            destination: "10.0.0.2".into(),
            source_port: 40000,
            destination_port: 80,
            endpoint: Some(endpoint.into()),
            peer: Some(peer.into()),
            local_identity: 0,
            remote_identity: 0,
            rule_id: 0,
            rule: String::new(),
            bytes: 60,
        }
    }

    fn sample() -> WorkloadGraph {
        use Direction::*;
        WorkloadGraph::from_records(&[
            record(
                Ingress,
                "shop/db-0",
                "shop/web-7d9f8b6c5-x2k4q",
                Verdict::Allowed,
            ),
            record(
                Egress,
                "shop/web-7d9f8b6c5-q8zzt",
                "shop/db-0",
                Verdict::Allowed,
            ),
            record(Ingress, "shop/db-0", "misc/x", Verdict::Dropped),
            record(Ingress, "shop/db-0", "misc/x", Verdict::Audit),
            record(Ingress, "shop/db-0", "misc/x", Verdict::Audit),
        ])
    }

    #[test]
    fn edges_count_records_per_verdict_between_workloads() {
        let g = sample();
        assert_eq!(
            g.nodes.iter().map(String::as_str).collect::<Vec<_>>(),
            ["misc/x", "shop/db", "shop/web"]
        );
        assert_eq!(g.edges.len(), 2);
        let web_db = g.edges[&("shop/web".into(), "shop/db".into())];
        assert_eq!((web_db.allowed, web_db.denied, web_db.audit), (2, 0, 0));
        let x_db = g.edges[&("misc/x".into(), "shop/db".into())];
        assert_eq!((x_db.allowed, x_db.denied, x_db.audit), (0, 1, 2));
    }

    #[test]
    fn dot_is_one_digraph_with_a_node_and_a_labelled_edge_each() {
        let dot = sample().to_dot();
        assert!(dot.starts_with("digraph moat_flows {\n"), "{dot}");
        assert!(dot.ends_with("}\n"), "{dot}");
        assert_eq!(dot.matches('{').count(), dot.matches('}').count());
        assert_eq!(dot.matches('"').count() % 2, 0, "balanced quotes: {dot}");
        assert!(dot.contains("  \"shop/web\";\n"), "{dot}");
        assert!(
            dot.contains("  \"shop/web\" -> \"shop/db\" [label=\"allowed 2\", color=green];\n")
        );
        assert!(dot.contains(
            "  \"misc/x\" -> \"shop/db\" [label=\"denied 1, audit-would-deny 2\", color=red];\n"
        ));
        assert_eq!(dot.matches(" -> ").count(), 2);
    }

    #[test]
    fn dot_escapes_quotes_in_names() {
        let g = WorkloadGraph::from_records(&[record(
            Direction::Ingress,
            "a/b",
            "we\"ird",
            Verdict::Allowed,
        )]);
        assert!(
            g.to_dot().contains("\"we\\\"ird\" -> \"a/b\""),
            "{}",
            g.to_dot()
        );
    }

    #[test]
    fn mermaid_declares_every_node_once_and_styles_every_edge() {
        let m = sample().to_mermaid();
        let lines: Vec<&str> = m.lines().collect();
        assert_eq!(lines[0], "flowchart LR");
        assert!(lines.contains(&"  n0[\"misc/x\"]"), "{m}");
        assert!(lines.contains(&"  n1[\"shop/db\"]"), "{m}");
        assert!(lines.contains(&"  n2[\"shop/web\"]"), "{m}");
        assert!(
            lines.contains(&"  n0 -->|\"denied 1, audit-would-deny 2\"| n1"),
            "{m}"
        );
        assert!(lines.contains(&"  n2 -->|\"allowed 2\"| n1"), "{m}");
        assert!(lines.contains(&"  linkStyle 0 stroke:red"), "{m}");
        assert!(lines.contains(&"  linkStyle 1 stroke:green"), "{m}");
        // Ids only: no raw workload name is used as a Mermaid id.
        assert!(lines[1..].iter().all(|l| l.trim_start().starts_with('n')
            || l.trim_start().starts_with("linkStyle")));
    }
}
