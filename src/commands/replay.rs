//! `keywatch replay`: the engine over JSON Lines files, offline, printing the report of spec section 6.

use super::mapped::MappedReader;
use crate::engine::view::{AlertView, StateReport};
use crate::engine::{Alert, Disposition, Engine};
use crate::timefmt::Millis;
use std::io::{self, BufRead, BufReader, BufWriter, Seek, Write};
use std::path::Path;

/// Counts and positions while feeding one input.
pub struct Input<'a> {
    pub name: &'a str,
    pub reader: Box<dyn BufRead + 'a>,
}

/// Opens `-` (stdin) or a file, with its size when known (for the progress bar). Regular files are
/// read through a sliding memory map ([`MappedReader`]), anything else (pipes, devices) with `read`.
pub fn open_input(name: &str) -> io::Result<(Box<dyn BufRead>, Option<u64>)> {
    if name == "-" {
        return Ok((
            Box::new(BufReader::with_capacity(1 << 20, io::stdin())),
            None,
        ));
    }
    let file = std::fs::File::open(name)?;
    let meta = file.metadata().ok();
    // Opening a directory succeeds on Linux and only reading fails: refuse it here, where every
    // caller reports a bad input name (exit 1), not mid-run (exit 2).
    if meta.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory, not a JSON Lines file",
        ));
    }
    let size = meta.as_ref().map(|m| m.len());
    if meta.is_some_and(|m| m.is_file()) {
        // Regular files are mapped a window at a time: no copy out of the page cache.
        return Ok((Box::new(MappedReader::new(file)), size));
    }
    Ok((Box::new(BufReader::with_capacity(1 << 20, file)), size))
}

/// Feeds every line of `reader` to the engine and hands raised alerts to `sink`. Blank lines are
/// skipped; invalid records are logged with their position. `progress` is told the bytes read.
///
/// Lines are taken straight out of the reader's buffer (SIMD newline search, no copy); only a
/// line that straddles two buffer fills is copied, into `carry`.
pub fn feed(
    engine: &mut Engine,
    name: &str,
    reader: &mut dyn BufRead,
    sink: &mut dyn FnMut(Vec<Alert>) -> io::Result<()>,
    progress: &mut dyn FnMut(u64),
) -> io::Result<()> {
    let mut carry: Vec<u8> = Vec::new();
    let mut number = 0u64;
    let mut since_progress = 0u64;
    let mut one = |line: &[u8], number: &mut u64| -> io::Result<()> {
        *number += 1;
        let record = trim_line(line);
        if record.is_empty() {
            return Ok(());
        }
        if let Disposition::Invalid(reason) = engine.ingest(record) {
            tracing::warn!(input = name, line = *number, %reason, "invalid record");
        }
        if engine.has_alerts() {
            sink(engine.take_alerts())?;
        }
        Ok(())
    };
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if !carry.is_empty() {
                one(&carry, &mut number)?;
            }
            break;
        }
        let len = buf.len();
        let mut start = 0;
        if !carry.is_empty() {
            match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    carry.extend_from_slice(&buf[..=i]);
                    one(&carry, &mut number)?;
                    carry.clear();
                    start = i + 1;
                }
                None => {
                    carry.extend_from_slice(buf);
                    reader.consume(len);
                    continue;
                }
            }
        }
        let base = start;
        for i in memchr::memchr_iter(b'\n', &buf[base..]) {
            let end = base + i + 1;
            one(&buf[start..end], &mut number)?;
            start = end;
        }
        carry.extend_from_slice(&buf[start..]);
        reader.consume(len);
        since_progress += len as u64;
        if since_progress >= 1 << 22 {
            progress(since_progress);
            since_progress = 0;
        }
    }
    progress(since_progress);
    Ok(())
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r' | b' ' | b'\t') {
        end -= 1;
    }
    let mut start = 0;
    while start < end && matches!(line[start], b' ' | b'\t') {
        start += 1;
    }
    &line[start..end]
}

/// Writes the report: state, then the alerts in the order raised (read back from `alerts`, one
/// JSON object per line), then the counters.
pub fn write_report(
    out: &mut dyn Write,
    state: &StateReport,
    alerts: &mut dyn BufRead,
) -> io::Result<()> {
    out.write_all(b"{\n  \"deployments\": ")?;
    serde_json::to_writer_pretty(&mut *out, &state.deployments)?;
    out.write_all(b",\n  \"keys\": ")?;
    serde_json::to_writer_pretty(&mut *out, &state.keys)?;
    out.write_all(b",\n  \"alerts\": [")?;
    let mut first = true;
    let mut line = String::new();
    loop {
        line.clear();
        if alerts.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            continue;
        }
        out.write_all(if first { b"\n    " } else { b",\n    " })?;
        out.write_all(l.as_bytes())?;
        first = false;
    }
    out.write_all(if first {
        b"],\n  \"stats\": "
    } else {
        b"\n  ],\n  \"stats\": "
    })?;
    serde_json::to_writer(&mut *out, &state.stats)?;
    out.write_all(b"\n}\n")?;
    out.flush()
}

/// Replays `inputs` through `engine`, evaluates deadlines at `now` (default: the latest eventTime
/// read) and writes the report to `out`. Alerts are spilled to a temporary file so that memory does
/// not grow with the input.
pub fn replay(
    engine: &mut Engine,
    inputs: &[String],
    now: Option<Millis>,
    out: &mut dyn Write,
    show_progress: bool,
) -> Result<Millis, ReplayError> {
    let spill = tempfile::tempfile().map_err(ReplayError::Io)?;
    let mut spill = BufWriter::with_capacity(1 << 16, spill);
    let mut sink = |alerts: Vec<Alert>| -> io::Result<()> {
        for a in &alerts {
            serde_json::to_writer(&mut spill, &AlertView::from(a))?;
            spill.write_all(b"\n")?;
        }
        Ok(())
    };
    // Alerts raised by registering the configured deployments (shared keys) come first.
    sink(engine.take_alerts()).map_err(ReplayError::Io)?;
    for name in inputs {
        let (mut reader, size) = open_input(name).map_err(|e| ReplayError::Open {
            name: name.clone(),
            source: e,
        })?;
        let bar = progress_bar(show_progress, size, name);
        let mut progress = |n: u64| {
            if let Some(b) = &bar {
                b.inc(n)
            }
        };
        feed(engine, name, &mut reader, &mut sink, &mut progress).map_err(|e| {
            ReplayError::Read {
                name: name.clone(),
                source: e,
            }
        })?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    // Deadlines are evaluated at --now, else at the latest eventTime read; with neither (no valid
    // event read), not at all: the wall clock would make the result depend on when it ran. The
    // report then shows approvals as of the wall clock (display only).
    let at = now.or(engine.latest_event_time());
    if let Some(at) = at {
        engine.tick(at);
    }
    let now = at.unwrap_or_else(Millis::now);
    sink(engine.take_alerts()).map_err(ReplayError::Io)?;
    let mut spill = spill
        .into_inner()
        .map_err(|e| ReplayError::Io(e.into_error()))?;
    spill.rewind().map_err(ReplayError::Io)?;
    let mut alerts = BufReader::new(&mut spill);
    let state = engine.state_report(now);
    write_report(out, &state, &mut alerts).map_err(ReplayError::Io)?;
    Ok(now)
}

fn progress_bar(show: bool, size: Option<u64>, name: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    let size = size?;
    if !show || size < 32 << 20 || !io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(
        Path::new(name)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    Some(bar)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay: cannot open {name}: {source}")]
    Open { name: String, source: io::Error },
    #[error("replay: reading {name}: {source}")]
    Read { name: String, source: io::Error },
    #[error("replay: {0}")]
    Io(io::Error),
}
