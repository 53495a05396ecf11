//! Prometheus text exposition (format 0.0.4) over a minimal HTTP endpoint.
//!
//! Metrics are set by the parts of the host agent that own the numbers; [`Metrics::render`]
//! writes them sorted by name and labels, so scrapes are stable. `GET /metrics` returns them;
//! any other path is a 404. Labels are escaped as the format requires.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
}

#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    kind: Option<Kind>,
    /// Sorted label pairs → value.
    series: BTreeMap<Vec<(&'static str, String)>, f64>,
}

/// The host agent's metrics, shared by reference.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    families: Arc<Mutex<BTreeMap<&'static str, Family>>>,
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Declares a metric (idempotent).
    pub fn describe(&self, name: &'static str, kind: Kind, help: &'static str) {
        let mut f = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let fam = f.entry(name).or_default();
        fam.help = help;
        fam.kind = Some(kind);
    }

    /// Sets a series' value.
    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        let mut key: Vec<(&'static str, String)> =
            labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        key.sort();
        let mut f = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        f.entry(name).or_default().series.insert(key, value);
    }

    /// Adds to a series' value (counters).
    pub fn add(&self, name: &'static str, labels: &[(&'static str, &str)], delta: f64) {
        let mut key: Vec<(&'static str, String)> =
            labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        key.sort();
        let mut f = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        *f.entry(name).or_default().series.entry(key).or_insert(0.0) += delta;
    }

    /// Removes every series of a metric whose labels include `label = value` (a DPU gone).
    pub fn remove_matching(&self, name: &'static str, label: &'static str, value: &str) {
        let mut f = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fam) = f.get_mut(name) {
            fam.series
                .retain(|k, _| !k.iter().any(|(l, v)| *l == label && v == value));
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let f = self.families.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        for (name, fam) in f.iter() {
            if !fam.help.is_empty() {
                let _ = writeln!(out, "# HELP {name} {}", escape_help(fam.help));
            }
            match fam.kind {
                Some(Kind::Counter) => {
                    let _ = writeln!(out, "# TYPE {name} counter");
                }
                Some(Kind::Gauge) => {
                    let _ = writeln!(out, "# TYPE {name} gauge");
                }
                None => {}
            }
            for (labels, v) in &fam.series {
                out.push_str(name);
                if !labels.is_empty() {
                    out.push('{');
                    for (i, (k, val)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_label(val));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", fmt_value(*v));
            }
        }
        out
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A budget for WARN lines that go with a counter: the first [`WarnLimiter::examples`]
/// occurrences of a window are logged in full, the rest only counted per reason code, and
/// [`WarnLimiter::summary`] hands those counts back once the window is over (for one summary
/// line). A replay of a million bad routes thus logs a handful of examples and one line per
/// window, while the counter metric counts every one.
#[derive(Debug, Clone)]
pub struct WarnLimiter {
    window: std::time::Duration,
    examples: u32,
    started: Option<std::time::Instant>,
    shown: u32,
    suppressed: BTreeMap<&'static str, u64>,
}

impl WarnLimiter {
    /// At most `examples` full lines per `window`.
    pub fn new(examples: u32, window: std::time::Duration) -> WarnLimiter {
        WarnLimiter {
            window,
            examples,
            started: None,
            shown: 0,
            suppressed: BTreeMap::new(),
        }
    }

    /// One occurrence with reason `code` at `now`: true if it is to be logged in full, false if
    /// it is only counted for the summary.
    pub fn allow(&mut self, now: std::time::Instant, code: &'static str) -> bool {
        match self.started {
            Some(t) if now.duration_since(t) < self.window => {}
            // A new window; counts of the last one not yet summarised stay for the summary.
            _ => {
                self.started = Some(now);
                self.shown = 0;
            }
        }
        if self.shown < self.examples {
            self.shown += 1;
            true
        } else {
            *self.suppressed.entry(code).or_insert(0) += 1;
            false
        }
    }

    /// Occurrences counted for the summary without being offered for a full line (their
    /// details were not kept).
    pub fn suppressed(&mut self, code: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        if self.started.is_none() {
            self.started = Some(std::time::Instant::now());
        }
        *self.suppressed.entry(code).or_insert(0) += n;
    }

    /// When a summary is due (the end of the current window), if anything was suppressed.
    pub fn due(&self) -> Option<std::time::Instant> {
        if self.suppressed.is_empty() {
            return None;
        }
        Some(
            self.started
                .map_or_else(std::time::Instant::now, |t| t + self.window),
        )
    }

    /// The occurrences not logged, per reason code, once their window is over (then reset).
    pub fn summary(&mut self, now: std::time::Instant) -> Option<BTreeMap<&'static str, u64>> {
        let due = self.due()?;
        if now < due {
            return None;
        }
        Some(std::mem::take(&mut self.suppressed))
    }

    /// The window.
    pub fn window(&self) -> std::time::Duration {
        self.window
    }
}

/// `a=1 b=2` from per-code counts, for summary lines.
pub fn format_counts(counts: &BTreeMap<&'static str, u64>) -> String {
    let mut out = String::new();
    for (i, (k, n)) in counts.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{k}={n}");
    }
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((mut stream, _)) = r else { continue };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    // Read until the end of the request head (bounded).
                    while n < buf.len() {
                        match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf[n..])).await {
                            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                            Ok(Ok(k)) => {
                                n += k;
                                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let ok = head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?");
                    let (status, ctype, body) = if ok {
                        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render())
                    } else {
                        ("404 Not Found", "text/plain", "try GET /metrics\n".to_owned())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(resp.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// The address a listener is bound to, for logs.
pub fn describe_addr(addr: &SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn renders_sorted_typed_and_escaped() {
        let m = Metrics::new();
        m.describe("dpucp_routes", Kind::Gauge, "Routes by status.");
        m.set("dpucp_routes", &[("status", "software"), ("dpu", "a")], 3.0);
        m.set(
            "dpucp_routes",
            &[("dpu", "a"), ("status", "offloaded")],
            10.0,
        );
        m.describe("dpucp_fpm_messages_total", Kind::Counter, "FPM messages.");
        m.add("dpucp_fpm_messages_total", &[], 2.0);
        m.add("dpucp_fpm_messages_total", &[], 3.0);
        m.set("odd", &[("why", "say \"hi\"\\\n")], 0.5);
        let text = m.render();
        assert_eq!(
            text,
            "# HELP dpucp_fpm_messages_total FPM messages.\n\
             # TYPE dpucp_fpm_messages_total counter\n\
             dpucp_fpm_messages_total 5\n\
             # HELP dpucp_routes Routes by status.\n\
             # TYPE dpucp_routes gauge\n\
             dpucp_routes{dpu=\"a\",status=\"offloaded\"} 10\n\
             dpucp_routes{dpu=\"a\",status=\"software\"} 3\n\
             odd{why=\"say \\\"hi\\\"\\\\\\n\"} 0.5\n"
        );
        m.remove_matching("dpucp_routes", "dpu", "a");
        assert!(!m.render().contains("dpucp_routes{"));
    }

    #[test]
    fn warn_limiter_shows_examples_then_summarises_per_window() {
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut l = WarnLimiter::new(2, ms(1000));
        assert_eq!(l.due(), None);
        assert!(l.allow(t0, "a"));
        assert!(l.allow(t0, "a"));
        assert!(!l.allow(t0 + ms(10), "a"));
        assert!(!l.allow(t0 + ms(20), "b"));
        assert!(!l.allow(t0 + ms(30), "b"));
        assert_eq!(l.due(), Some(t0 + ms(1000)));
        assert_eq!(l.summary(t0 + ms(999)), None);
        let s = l.summary(t0 + ms(1000)).unwrap();
        assert_eq!(format_counts(&s), "a=1 b=2");
        assert_eq!(l.due(), None);
        // The next window shows examples again.
        assert!(l.allow(t0 + ms(1500), "a"));
        assert_eq!(l.summary(t0 + ms(5000)), None);
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let m = Metrics::new();
        m.set("up", &[], 1.0);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let srv = tokio::spawn(serve(l, m, rx));
        for (path, want) in [("/metrics", "200 OK"), ("/", "404")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut resp = String::new();
            s.read_to_string(&mut resp).await.unwrap();
            assert!(resp.contains(want), "{resp}");
            if path == "/metrics" {
                assert!(resp.ends_with("\r\n\r\nup 1\n"), "{resp}");
            }
        }
        tx.send(true).unwrap();
        srv.await.unwrap();
    }
}
