//! One-line error messages with their causes.

use std::error::Error;

/// The error's message and then each of its sources' (`Error::source`), outermost first, leaving
/// out a message that an earlier one already ends with (many errors repeat their cause).
pub fn causes(error: &dyn Error) -> Vec<String> {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.ends_with(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::causes;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct E {
        text: &'static str,
        #[source]
        source: Option<Box<E>>,
    }

    fn chain(texts: &[&'static str]) -> E {
        texts
            .iter()
            .rev()
            .fold(None, |source, text| {
                Some(E {
                    text,
                    source: source.map(Box::new),
                })
            })
            .expect("at least one")
    }

    #[test]
    fn lists_each_cause_once() {
        let e = chain(&[
            "cannot open the store",
            "error returned from database: file is not a database",
            "file is not a database",
            "os error 26",
        ]);
        assert_eq!(
            causes(&e),
            [
                "cannot open the store",
                "error returned from database: file is not a database",
                "os error 26"
            ]
        );
        assert_eq!(causes(&chain(&["alone"])), ["alone"]);
    }
}
