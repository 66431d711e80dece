//! Throughput of `event::skim`, the per-record scan that decides relevance, on a file of
//! Activity Tracker records (one JSON document per line).
//!
//!     cargo bench --bench skim -- [FILE] [MAX_LINES] [ONLY]
//!
//! FILE defaults to bench/out/events.jsonl (made by bench/gen-events), MAX_LINES to 200000; with
//! ONLY = `skim`, only `event::skim` is timed (for `perf stat`). The records are loaded into
//! memory first, so only the scan is timed; the best of 5 runs is shown, as wall time and as this
//! thread's CPU time (the one to trust on a busy machine). Besides `skim` it times the
//! serde_json-based skim it replaced (kept below as `serde_skim`) and a full
//! `serde_json::from_slice::<Value>` and the event digest of a parsed record (the two costs of the
//! ~2.5% of records parsed in full), and checks that `skim` agrees with the full parse on every
//! record (same validity, same fields). Exits 1 on any disagreement.

use keywatch::event::{self, ActionField, InvalidReason};
use serde_json::Value;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let path = args
        .first()
        .cloned()
        .unwrap_or_else(|| "bench/out/events.jsonl".into());
    let max: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skim bench: cannot read {path}: {e} (make it with bench/gen-events)");
            std::process::exit(2);
        }
    };
    let lines: Vec<&[u8]> = data
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .take(max)
        .collect();
    let bytes: usize = lines.iter().map(|l| l.len()).sum();
    println!(
        "{} records, {:.1} MB, {:.0} bytes/record, from {path}",
        lines.len(),
        bytes as f64 / 1e6,
        bytes as f64 / lines.len() as f64
    );

    let only_skim = args.get(2).is_some_and(|a| a == "skim");
    let disagreements = if only_skim {
        0
    } else {
        check_against_value(&lines)
    };
    println!(
        "agreement with serde_json::Value: {} disagreements",
        disagreements
    );

    let time = |name: &str, f: &dyn Fn(&[u8]) -> usize| {
        let mut best = Duration::MAX;
        let mut best_cpu: Option<Duration> = None;
        for _ in 0..5 {
            let (start, cpu_start) = (Instant::now(), thread_cpu_time());
            let mut n = 0usize;
            for l in &lines {
                n += f(black_box(l));
            }
            black_box(n);
            best = best.min(start.elapsed());
            if let (Some(a), Some(b)) = (cpu_start, thread_cpu_time()) {
                best_cpu = Some(best_cpu.map_or(b - a, |c| c.min(b - a)));
            }
        }
        let rate = |d: Duration| {
            let s = d.as_secs_f64();
            format!(
                "{:>7.1} ns/record {:>9.0} records/s {:>6.0} MB/s",
                s * 1e9 / lines.len() as f64,
                lines.len() as f64 / s,
                bytes as f64 / 1e6 / s
            )
        };
        match best_cpu {
            Some(cpu) => println!("{name:<26} wall {}   cpu {}", rate(best), rate(cpu)),
            None => println!("{name:<26} wall {}", rate(best)),
        }
    };
    time("event::skim", &|l| usize::from(event::skim(l).is_ok()));
    if only_skim {
        return;
    }
    time("serde_skim (the old skim)", &|l| {
        usize::from(serde_skim::skim(l).is_ok())
    });
    time("serde_json Value", &|l| {
        usize::from(serde_json::from_slice::<Value>(l).is_ok())
    });
    // The digest of the ~2.5% of records parsed in full (after the Value parse above): its cost
    // per fully parsed record, cycling through the parsed records.
    let values: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .collect();
    let k = std::cell::Cell::new(0usize);
    time("digest of a parsed Value", &|_| {
        let i = k.get();
        k.set((i + 1) % values.len());
        usize::from(event::EventDigest::of_value(&values[i]).0[0] > 0)
    });
    if disagreements > 0 {
        std::process::exit(1);
    }
}

/// CPU time of this thread (Linux), which unlike wall time ignores other work on the machine.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(Duration::from_nanos(
        stat.split_whitespace().next()?.parse().ok()?,
    ))
}

/// Counts records on which `skim` and a full serde_json parse disagree.
fn check_against_value(lines: &[&[u8]]) -> usize {
    let mut bad = 0;
    for (n, l) in lines.iter().enumerate() {
        let got = event::skim(l);
        let want = serde_json::from_slice::<Value>(l);
        let same = match (&got, &want) {
            (Err(InvalidReason::NotJson(_)), Err(_)) => true,
            (Err(InvalidReason::NotAnObject), Ok(v)) => !v.is_object(),
            (Ok(s), Ok(Value::Object(m))) => {
                let st = |k: &str| m.get(k).and_then(Value::as_str);
                let action = match m.get("action") {
                    None => ActionField::Missing,
                    Some(Value::String(a)) => ActionField::Str(a.as_str().into()),
                    Some(_) => ActionField::NotAString,
                };
                let target = m
                    .get("target")
                    .and_then(Value::as_object)
                    .and_then(|t| t.get("id"))
                    .and_then(Value::as_str);
                s.action == action
                    && s.target_id.as_deref() == target
                    && s.event_time.as_deref() == st("eventTime")
                    && s.correlation_id.as_deref() == st("correlationId")
            }
            _ => false,
        };
        if !same {
            bad += 1;
            if bad <= 5 {
                eprintln!(
                    "record {}: skim {:?}, serde_json {:?}",
                    n + 1,
                    got.map(|_| "object"),
                    want.map(|_| "ok")
                );
            }
        }
    }
    bad
}

/// The serde_json-based skim that `event::skim` replaced, for comparison.
mod serde_skim {
    use keywatch::event::{ActionField, InvalidReason, Skim};
    use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use std::borrow::Cow;
    use std::fmt;

    pub fn skim(line: &[u8]) -> Result<Skim<'_>, InvalidReason> {
        let mut de = serde_json::Deserializer::from_slice(line);
        let skim = match TopLevel::deserialize(&mut de) {
            Ok(TopLevel(Some(s))) => s,
            Ok(TopLevel(None)) => return Err(InvalidReason::NotAnObject),
            Err(e) => return Err(InvalidReason::NotJson(e.to_string())),
        };
        de.end()
            .map_err(|e| InvalidReason::NotJson(e.to_string()))?;
        Ok(skim)
    }

    struct TopLevel<'a>(Option<Skim<'a>>);

    impl<'de> Deserialize<'de> for TopLevel<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(TopVisitor)
        }
    }

    struct TopVisitor;

    impl<'de> Visitor<'de> for TopVisitor {
        type Value = TopLevel<'de>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an Activity Tracker event")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut skim = Skim {
                action: ActionField::Missing,
                target_id: None,
                event_time: None,
                correlation_id: None,
            };
            while let Some(field) = map.next_key::<Field>()? {
                match field {
                    Field::Action => {
                        skim.action = match map.next_value::<MaybeStr>()?.0 {
                            Some(s) => ActionField::Str(s),
                            None => ActionField::NotAString,
                        }
                    }
                    Field::Target => skim.target_id = map.next_value::<TargetId>()?.0,
                    Field::EventTime => skim.event_time = map.next_value::<MaybeStr>()?.0,
                    Field::CorrelationId => skim.correlation_id = map.next_value::<MaybeStr>()?.0,
                    Field::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(TopLevel(Some(skim)))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(TopLevel(None))
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(TopLevel(None))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(TopLevel(None))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(TopLevel(None))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(TopLevel(None))
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(TopLevel(None))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(TopLevel(None))
        }
    }

    enum Field {
        Action,
        Target,
        EventTime,
        CorrelationId,
        Other,
    }

    impl<'de> Deserialize<'de> for Field {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Field;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a field name")
                }
                fn visit_str<E>(self, v: &str) -> Result<Field, E> {
                    Ok(match v {
                        "action" => Field::Action,
                        "target" => Field::Target,
                        "eventTime" => Field::EventTime,
                        "correlationId" => Field::CorrelationId,
                        _ => Field::Other,
                    })
                }
            }
            d.deserialize_identifier(V)
        }
    }

    /// A value that is kept when it is a string and skipped (validated) otherwise.
    struct MaybeStr<'a>(Option<Cow<'a, str>>);

    impl<'de> Deserialize<'de> for MaybeStr<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(MaybeStrVisitor)
        }
    }

    struct MaybeStrVisitor;

    impl<'de> Visitor<'de> for MaybeStrVisitor {
        type Value = MaybeStr<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(MaybeStr(Some(Cow::Borrowed(v))))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(MaybeStr(Some(Cow::Owned(v.to_owned()))))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(MaybeStr(Some(Cow::Owned(v))))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(MaybeStr(None))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(MaybeStr(None))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(MaybeStr(None))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(MaybeStr(None))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(MaybeStr(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(MaybeStr(None))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(MaybeStr(None))
        }
    }

    /// `target` reduced to its `id` string.
    struct TargetId<'a>(Option<Cow<'a, str>>);

    impl<'de> Deserialize<'de> for TargetId<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = TargetId<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a target object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut id = None;
                    while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                        if k == "id" {
                            id = map.next_value::<MaybeStr>()?.0;
                        } else {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                    Ok(TargetId(id))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(TargetId(None))
                }
                fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                    Ok(TargetId(None))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                    Ok(TargetId(None))
                }
                fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                    Ok(TargetId(None))
                }
                fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                    Ok(TargetId(None))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                    Ok(TargetId(None))
                }
                fn visit_unit<E>(self) -> Result<Self::Value, E> {
                    Ok(TargetId(None))
                }
            }
            d.deserialize_any(V)
        }
    }
}
