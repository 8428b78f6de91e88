//! The live view: a full-screen table of the swarm, redrawn while the demo runs on a terminal.

use super::supervisor::Demo;

impl Demo {
    pub(crate) fn render(&self) -> String {
        let mut s = format!(
            "shoal demo — {:.1}s — {}\n\n",
            self.now(),
            self.work.display()
        );
        for n in &self.nodes {
            let (p, st) = n.last.as_ref().map_or((0.0, "starting".to_string()), |t| {
                (t.progress, t.state.clone())
            });
            let w = 30;
            let f = ((p * w as f64) as usize).min(w);
            let alive = if n.child.is_some() { "" } else { " (down)" };
            s.push_str(&format!(
                "{:<10} {:<11} [{}{}] {:5.1}% {}{}\n",
                n.name,
                n.ip,
                "#".repeat(f),
                "-".repeat(w - f),
                p * 100.0,
                st,
                alive
            ));
        }
        s.push('\n');
        for (i, t) in self.trackers.iter().enumerate() {
            s.push_str(&format!(
                "tracker {} {} {}\n",
                ["A (primary)", "B"][i.min(1)],
                t.listen,
                if t.child.is_some() { "up" } else { "DOWN" }
            ));
        }
        s.push_str("\nlast events:\n");
        for (t, m) in self.timeline.iter().rev().take(6).rev() {
            s.push_str(&format!("  {t:6.1}s  {m}\n"));
        }
        s
    }
}
