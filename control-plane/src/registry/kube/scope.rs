//! Discovery selectors, as Istio's `discoverySelectors`: label selectors on
//! Namespaces that choose which namespaces' Services, EndpointSlices, routes and
//! policies become part of the mesh. Several selectors are ORed; none selects every
//! namespace. The root namespace is always in (mesh-wide policies live there).
//!
//! Selection happens when a snapshot is built, from the namespaces' current labels,
//! so labelling a namespace brings its services in at the next snapshot without a
//! re-list. Pods stay in every snapshot: the CA checks a caller's pod wherever it
//! runs, and a meshed pod in an unselected namespace still gets its identity.
//!
//! The syntax is kubectl's `-l`: `key=value` (or `==`), `key!=value`, `key`, `!key`,
//! `key in (a,b)`, `key notin (a,b)`, comma-separated and all required.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    #[error("discovery selector `{selector}`: {reason}")]
    Invalid { selector: String, reason: String },
}

/// Which namespaces are in the mesh's discovery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceScope {
    /// ORed; empty: every namespace.
    selectors: Vec<Selector>,
}

impl NamespaceScope {
    /// Every namespace.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses each selector (kubectl's label selector syntax).
    pub fn parse<S: AsRef<str>>(selectors: &[S]) -> Result<Self, ScopeError> {
        let selectors = selectors
            .iter()
            .map(|s| parse_selector(s.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self { selectors })
    }

    pub fn selects_all(&self) -> bool {
        self.selectors.is_empty()
    }

    /// Whether a namespace with these labels is in.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selects_all() || self.selectors.iter().any(|s| s.matches(labels))
    }
}

fn parse_selector(text: &str) -> Result<Selector, ScopeError> {
    let invalid = |reason: &str| ScopeError::Invalid {
        selector: text.to_owned(),
        reason: reason.to_owned(),
    };
    let mut selector = Selector::default();
    let terms = split_terms(text).ok_or_else(|| invalid("unbalanced parentheses"))?;
    if terms.iter().all(|t| t.trim().is_empty()) {
        return Err(invalid(
            "empty (leave the flag out to select every namespace)",
        ));
    }
    for term in terms {
        let term = term.trim();
        if term.is_empty() {
            return Err(invalid("an empty term between commas"));
        }
        selector.extend(parse_term(term).map_err(|reason| invalid(&reason))?);
    }
    Ok(selector)
}

/// Splits on the commas outside parentheses; `None` when they do not balance.
fn split_terms(text: &str) -> Option<Vec<&str>> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return None;
        }
    }
    (depth == 0).then(|| {
        terms.push(&text[start..]);
        terms
    })
}

fn parse_term(term: &str) -> Result<Expression, String> {
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Expression::NotEqual(key_of(key)?, value_of(value)?));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Expression::Equal(key_of(key)?, value_of(value)?));
    }
    for (op, notin) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = term.split_once(op) {
            let set = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("`{term}`: the values go in parentheses"))?;
            let values = set
                .split(',')
                .map(value_of)
                .collect::<Result<BTreeSet<_>, _>>()?;
            let key = key_of(key)?;
            return Ok(if notin {
                Expression::NotIn(key, values)
            } else {
                Expression::In(key, values)
            });
        }
    }
    match term.strip_prefix('!') {
        Some(key) => Ok(Expression::DoesNotExist(key_of(key)?)),
        None => Ok(Expression::Exists(key_of(term)?)),
    }
}

/// A label key: `[prefix/]name`, name 1–63 of `[A-Za-z0-9._-]` starting and
/// ending alphanumeric, prefix a DNS subdomain.
fn key_of(key: &str) -> Result<String, String> {
    let key = key.trim();
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(key.to_owned())
    } else {
        Err(format!("`{key}` is not a label key"))
    }
}

/// A label value: empty, or up to 63 of `[A-Za-z0-9._-]` starting and ending
/// alphanumeric.
fn value_of(value: &str) -> Result<String, String> {
    let value = value.trim();
    let ok = value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!("`{value}` is not a label value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_selector_selects_every_namespace() {
        let scope = NamespaceScope::parse::<&str>(&[]).unwrap();
        assert!(scope.selects_all());
        assert!(scope.selects(&labels(&[])));
    }

    #[test]
    fn each_form_of_kubectls_syntax_matches_as_kubernetes_does() {
        // (selector, the namespace's labels, selected)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case] = &[
            ("env=prod", &[("env", "prod")], true),
            ("env==prod", &[("env", "prod")], true),
            ("env=prod", &[("env", "dev")], false),
            ("env!=prod", &[], true),
            ("env!=prod", &[("env", "prod")], false),
            ("mesh", &[("mesh", "")], true),
            ("mesh", &[], false),
            ("!legacy", &[], true),
            ("!legacy", &[("legacy", "yes")], false),
            ("env in (prod, staging)", &[("env", "staging")], true),
            ("env in (prod,staging)", &[], false),
            ("env notin (dev)", &[], true),
            ("env notin (dev)", &[("env", "dev")], false),
            (
                "trellis.io/discovery=enabled,env in (a,b),!legacy",
                &[("trellis.io/discovery", "enabled"), ("env", "b")],
                true,
            ),
            (
                "trellis.io/discovery=enabled,env in (a,b),!legacy",
                &[
                    ("trellis.io/discovery", "enabled"),
                    ("env", "b"),
                    ("legacy", "1"),
                ],
                false,
            ),
        ];
        for (selector, pairs, want) in cases {
            let scope = NamespaceScope::parse(&[*selector]).unwrap();
            assert_eq!(
                scope.selects(&labels(pairs)),
                *want,
                "{selector} on {pairs:?}"
            );
        }
    }

    #[test]
    fn several_selectors_are_ored() {
        let scope = NamespaceScope::parse(&["team=a", "team=b"]).unwrap();
        assert!(scope.selects(&labels(&[("team", "b")])));
        assert!(!scope.selects(&labels(&[("team", "c")])));
    }

    #[test]
    fn a_malformed_selector_is_refused_with_the_reason() {
        for bad in [
            "",
            "env=prod,",
            "env in (a,b",
            "env in a,b",
            "bad key=x",
            "env=-x",
            "Trellis.IO/x=y",
            "env=prod)",
        ] {
            let error = NamespaceScope::parse(&[bad]).unwrap_err();
            let ScopeError::Invalid { selector, reason } = &error;
            assert_eq!(selector, bad);
            assert!(!reason.is_empty(), "{bad}: {error}");
        }
    }
}
