//! Typed, error-collecting access to toml's spanned document tree.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::values::quote;
use super::ConfigError;

type Value<'i> = Spanned<DeValue<'i>>;

/// Maps byte offsets to line numbers and collects errors.
pub(super) struct Ctx {
    line_starts: Vec<usize>,
    pub errors: Vec<ConfigError>,
}

impl Ctx {
    pub fn new(text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Ctx {
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line of a byte offset.
    pub fn line(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// 1-based column (in bytes) of a byte offset.
    pub fn column(&self, offset: usize) -> usize {
        let line = self.line(offset);
        offset - self.line_starts[line - 1] + 1
    }

    pub fn error(&mut self, path: &str, span: Range<usize>, message: impl Into<String>) {
        let line = Some(self.line(span.start));
        self.error_at(path, line, message);
    }

    pub fn error_at(&mut self, path: &str, line: Option<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            line,
            message: message.into(),
        });
    }

    fn type_error(&mut self, path: &str, value: &Value<'_>, expected: &str) {
        let found = value.get_ref().type_str();
        self.error(
            path,
            value.span(),
            format!("expected {expected}, found {} {found}", article(found)),
        );
    }
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// A string value with its location.
#[derive(Debug, Clone)]
pub(super) struct Str<'a> {
    pub path: String,
    pub span: Range<usize>,
    pub text: &'a str,
}

/// A string-or-array-of-strings value.
pub(super) struct StrList<'a> {
    pub items: Vec<Str<'a>>,
    /// Some element (or the value itself) had the wrong type; already reported.
    pub had_errors: bool,
}

/// A TOML table being read, with its path (`tunnel[1]`, `site`, `` for the root).
pub(super) struct Section<'a, 'i> {
    pub path: String,
    pub span: Range<usize>,
    table: &'a DeTable<'i>,
}

impl<'a, 'i> Section<'a, 'i> {
    pub fn new(path: String, span: Range<usize>, table: &'a DeTable<'i>) -> Self {
        Section { path, span, table }
    }

    /// Reads `value` as a table, reporting a type error otherwise.
    pub fn from_value(ctx: &mut Ctx, path: String, value: &'a Value<'i>) -> Option<Self> {
        match value.get_ref() {
            DeValue::Table(table) => Some(Section::new(path, value.span(), table)),
            _ => {
                ctx.type_error(&path, value, "a table");
                None
            }
        }
    }

    pub fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value<'i>> {
        self.table.get(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Span of the key itself (not its value), for errors about the key's presence.
    pub fn key_span(&self, key: &str) -> Option<Range<usize>> {
        self.table.get_key_value(key).map(|(k, _)| k.span())
    }

    /// Line of the table header, used for "missing key" errors.
    pub fn header_line(&self, ctx: &Ctx) -> Option<usize> {
        // The root table has an empty span at 0.
        (!self.path.is_empty()).then(|| ctx.line(self.span.start))
    }

    pub fn missing(&self, ctx: &mut Ctx, key: &str, why: &str) {
        let line = self.header_line(ctx);
        ctx.error_at(
            &self.child_path(key),
            line,
            format!("missing required key `{key}`{why}"),
        );
    }

    /// Reports every key not in `known`, suggesting a near miss.
    pub fn check_unknown(&self, ctx: &mut Ctx, known: &[&str]) {
        for key in self.table.keys() {
            let name = key.get_ref().as_ref();
            if known.contains(&name) {
                continue;
            }
            let mut message = format!("unknown key {}", quote_key(name));
            if let Some(hint) = suggest(name, known) {
                message.push_str(&format!(", did you mean `{hint}`?"));
            } else {
                let list: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                message.push_str(&format!(" (expected one of {})", list.join(", ")));
            }
            ctx.error(&self.child_path(name), key.span(), message);
        }
    }

    pub fn string(&self, ctx: &mut Ctx, key: &str) -> Option<Str<'a>> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        match value.get_ref() {
            DeValue::String(s) => Some(Str {
                path,
                span: value.span(),
                text: s.as_ref(),
            }),
            _ => {
                ctx.type_error(&path, value, "a string");
                None
            }
        }
    }

    /// A boolean value (None: absent or not a boolean, the latter reported).
    pub fn boolean(&self, ctx: &mut Ctx, key: &str) -> Option<bool> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                ctx.type_error(&self.child_path(key), value, "true or false");
                None
            }
        }
    }

    pub fn required_string(&self, ctx: &mut Ctx, key: &str) -> Option<Str<'a>> {
        if !self.has(key) {
            self.missing(ctx, key, "");
        }
        self.string(ctx, key)
    }

    /// An integer value and its span.
    pub fn integer(&self, ctx: &mut Ctx, key: &str) -> Option<(i64, Range<usize>)> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        match value.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some((n, value.span())),
                Err(_) => {
                    ctx.error(&path, value.span(), format!("integer {i} is out of range"));
                    None
                }
            },
            _ => {
                ctx.type_error(&path, value, "an integer");
                None
            }
        }
    }

    /// A string or an array of strings (`single_ok`), or only an array.
    pub fn strings(&self, ctx: &mut Ctx, key: &str, single_ok: bool) -> Option<StrList<'a>> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        let expected = if single_ok {
            "a string or an array of strings"
        } else {
            "an array of strings"
        };
        let mut list = StrList {
            items: Vec::new(),
            had_errors: false,
        };
        match value.get_ref() {
            DeValue::String(s) if single_ok => list.items.push(Str {
                path,
                span: value.span(),
                text: s.as_ref(),
            }),
            DeValue::Array(array) => {
                for (i, item) in array.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    match item.get_ref() {
                        DeValue::String(s) => list.items.push(Str {
                            path: item_path,
                            span: item.span(),
                            text: s.as_ref(),
                        }),
                        _ => {
                            ctx.type_error(&item_path, item, "a string");
                            list.had_errors = true;
                        }
                    }
                }
            }
            _ => {
                ctx.type_error(&path, value, expected);
                list.had_errors = true;
            }
        }
        Some(list)
    }

    /// A sub-table (inline or not).
    pub fn table(&self, ctx: &mut Ctx, key: &str) -> Option<Section<'a, 'i>> {
        let value = self.get(key)?;
        Section::from_value(ctx, self.child_path(key), value)
    }

    /// An array of tables (`[[key]]`), each with its path `key[i]`.
    pub fn tables(&self, ctx: &mut Ctx, key: &str) -> Vec<Section<'a, 'i>> {
        let Some(value) = self.get(key) else {
            return Vec::new();
        };
        let path = self.child_path(key);
        let DeValue::Array(array) = value.get_ref() else {
            ctx.type_error(
                &path,
                value,
                &format!("an array of tables (write each one as [[{key}]])"),
            );
            return Vec::new();
        };
        array
            .iter()
            .enumerate()
            .filter_map(|(i, item)| Section::from_value(ctx, format!("{path}[{i}]"), item))
            .collect()
    }
}

fn quote_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("`{key}`")
    } else {
        quote(key)
    }
}

/// The known key closest to `key`, if within edit distance 2.
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("tunnels", "tunnel"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("listen_prot", "listen_port"), 2);
        assert_eq!(
            suggest("endpoints", &["endpoint", "name"]),
            Some("endpoint")
        );
        assert_eq!(suggest("zzz", &["endpoint", "name"]), None);
    }

    #[test]
    fn lines_and_columns() {
        let ctx = Ctx::new("a\nbc\n\nd");
        assert_eq!(ctx.line(0), 1);
        assert_eq!(ctx.line(1), 1);
        assert_eq!(ctx.line(2), 2);
        assert_eq!(ctx.column(3), 2);
        assert_eq!(ctx.line(5), 3);
        assert_eq!(ctx.line(6), 4);
        assert_eq!(ctx.line(100), 4);
    }
}
