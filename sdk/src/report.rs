//! Builders for reports and findings.

use crate::{Finding, Report, Severity, Verdict};

impl Report {
    fn with(verdict: Verdict, summary: String) -> Self {
        Report { verdict, summary, findings: Vec::new(), score: None, details: None }
    }
    /// The model may go on. `summary` is printed after PASS.
    pub fn pass(summary: impl Into<String>) -> Self {
        Self::with(Verdict::Pass, summary.into())
    }
    /// The model must be rejected; `reason` is printed after FAIL.
    pub fn fail(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self::with(Verdict::Fail(reason.clone()), reason)
    }
    /// The stage does not apply; `reason` is printed after SKIP.
    pub fn skip(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self::with(Verdict::Skip(reason.clone()), reason)
    }
    /// Adds a finding.
    pub fn finding(mut self, finding: Finding) -> Self {
        self.findings.push(finding);
        self
    }
    /// Adds findings.
    pub fn findings(mut self, findings: impl IntoIterator<Item = Finding>) -> Self {
        self.findings.extend(findings);
        self
    }
    /// Sets the stage-defined score.
    pub fn score(mut self, score: f32) -> Self {
        self.score = Some(score);
        self
    }
    /// Sets the details, a JSON value copied into the report's `scan_details`.
    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details.to_string());
        self
    }
    /// Keeps at most `max` findings, the most severe first, and says how many
    /// were left out (rule `report.truncated`). The host refuses reports above
    /// its size cap, so a plugin that can find unboundedly many things should
    /// call this rather than fail for the wrong reason.
    pub fn cap_findings(mut self, max: usize) -> Self {
        if self.findings.len() > max {
            self.findings.sort_by_key(|f| std::cmp::Reverse(f.severity as u8));
            let dropped = self.findings.len() - max;
            self.findings.truncate(max);
            self.findings.push(Finding::new(
                "report.truncated",
                Severity::Info,
                format!("{dropped} more findings of lower or equal severity not listed"),
            ));
        }
        self
    }
    /// True when the verdict is FAIL.
    pub fn is_fail(&self) -> bool {
        matches!(self.verdict, Verdict::Fail(_))
    }
}

impl Finding {
    /// A finding with a stable rule id, a severity and a message.
    pub fn new(rule: impl Into<String>, severity: Severity, message: impl Into<String>) -> Self {
        Finding { rule: rule.into(), severity, message: message.into(), location: None, offset: None, confidence: None }
    }
    /// Where: a tensor name, metadata key, or a file of a folder.
    pub fn at(mut self, location: impl Into<String>) -> Self {
        self.location = Some(location.into());
        self
    }
    /// A byte offset in the file.
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
    /// How sure, from 0 to 1.
    pub fn confidence(mut self, confidence: f32) -> Self {
        self.confidence = Some(confidence);
        self
    }
}
