//! The generator of the Rust side of `bpf/relay.h`: the build script reads the header
//! with [`Abi::parse`], writes [`Abi::rust`] to `OUT_DIR` (which `xdp/abi.rs` includes)
//! and, when clang builds the program, compiles [`Abi::c_check`] for the BPF target. The
//! same file is a module of the crate's unit tests (`#[path]` in build.rs, `mod` in
//! xdp.rs), so the parser is tested on small headers.
//!
//! The header is our own and its syntax is restricted to what this parser reads:
//! - `struct tp_x { ... };` whose fields are `__u8`, `__u16`, `__u32`, `__u64`, an
//!   array of one of them with a literal length (`__u8 ip[16];`), or a `struct` defined
//!   earlier; every padding byte an explicit field (implicit padding is refused: the
//!   Rust side reads and writes whole structs, see `aya::Pod`);
//! - `#define TP_X EXPR` with integer literals (`U`, `UL`, `ULL` suffixes), earlier
//!   constants, `+ - * / << >> | &` and parentheses; the constant is a `u64` when a
//!   literal has an `L` suffix or a constant it uses is one, else a `u32`, unless the
//!   whole value is cast: `((__u8)1)`. A `#define` without a value is ignored;
//! - `enum tp_x { TP_A = 0, TP_B, ..., TP_X_MAX, };`: `u32` constants, the last one
//!   ending in `_MAX` being the count; for each enum a table of names (see
//!   [`Abi::rust`]);
//! - `/* comments */`: the one right before an item, or after a field or enumerator on
//!   its line, becomes its doc comment; `#include`, `#ifndef`, `#endif` are skipped.
//!
//! Struct `tp_chan_key` is `TpChanKey` in Rust; fields and constants keep their names.
//! The layout (offsets, sizes, alignments) is computed here from C's rules, and checked
//! against both compilers: `offset_of!` asserts for rustc, `_Static_assert`s for clang.

use std::collections::HashMap;
use std::fmt::Write as _;

/// Enumerator prefixes left out of the names of an enum's table, first match only
/// (`TP_PASS_NO_ENTRY` is `no_entry`, `TP_BYTES_UP` is `bytes_up`).
const NAME_PREFIXES: [&str; 2] = ["TP_PASS_", "TP_"];

/// A C field type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ty {
    /// `__u8` .. `__u64`: the size in bytes.
    Int(usize),
    /// An array of an integer type.
    Array(usize, usize),
    /// A struct defined earlier, by C name.
    Struct(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    ty: Ty,
    doc: Vec<String>,
    offset: usize,
    size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Struct {
    name: String,
    doc: Vec<String>,
    fields: Vec<Field>,
    size: usize,
    align: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Const {
    name: String,
    ty: &'static str,
    /// The value as a Rust expression.
    expr: String,
    doc: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Enumerator {
    name: String,
    value: u32,
    doc: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Enum {
    name: String,
    doc: Vec<String>,
    values: Vec<Enumerator>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Struct(Struct),
    Const(Const),
    Enum(Enum),
}

/// The structs, constants and enums of a header, in its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abi {
    items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Num(String),
    Punct(char),
    /// A comment's lines, without `/*`, `*/` and leading `*`.
    Comment(Vec<String>),
    /// The rest of a `#define` line.
    Define(String),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn comment_lines(body: &str) -> Vec<String> {
    body.lines()
        .map(|l| {
            let l = l.trim();
            let l = l.strip_prefix('*').unwrap_or(l);
            l.trim().to_string()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn lex(src: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut at_line_start = true;
    let mut rest = src;
    while let Some(c) = rest.chars().next() {
        if c == '\n' {
            line += 1;
            at_line_start = true;
            rest = &rest[1..];
            continue;
        }
        if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let start_line = line;
        if let Some(r) = rest.strip_prefix("/*") {
            let end = r
                .find("*/")
                .ok_or_else(|| format!("line {line}: unterminated comment"))?;
            let body = &r[..end];
            line += body.matches('\n').count();
            out.push(Token {
                tok: Tok::Comment(comment_lines(body)),
                line: start_line,
            });
            rest = &r[end + 2..];
            continue;
        }
        if let Some(r) = rest.strip_prefix("//") {
            let end = r.find('\n').unwrap_or(r.len());
            out.push(Token {
                tok: Tok::Comment(comment_lines(&r[..end])),
                line,
            });
            rest = &r[end..];
            continue;
        }
        if c == '#' && at_line_start {
            let end = rest.find('\n').unwrap_or(rest.len());
            let directive = rest[1..end].trim();
            if let Some(d) = directive.strip_prefix("define") {
                out.push(Token {
                    tok: Tok::Define(d.trim().to_string()),
                    line,
                });
            }
            rest = &rest[end..];
            continue;
        }
        at_line_start = false;
        if c.is_ascii_alphabetic() || c == '_' {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(Token {
                tok: Tok::Ident(rest[..end].to_string()),
                line,
            });
            rest = &rest[end..];
        } else if c.is_ascii_digit() {
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            out.push(Token {
                tok: Tok::Num(rest[..end].to_string()),
                line,
            });
            rest = &rest[end..];
        } else if "{}[];,=".contains(c) {
            out.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            rest = &rest[1..];
        } else {
            return Err(format!("line {line}: unexpected {c:?}"));
        }
    }
    Ok(out)
}

/// A C integer literal: its value and whether it has an `L` suffix.
fn literal(s: &str) -> Option<(u64, bool)> {
    let digits = s.trim_end_matches(['u', 'U', 'l', 'L']);
    let long = s[digits.len()..].contains(['l', 'L']);
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    Some((v, long))
}

fn int_size(name: &str) -> Option<usize> {
    match name {
        "__u8" => Some(1),
        "__u16" => Some(2),
        "__u32" => Some(4),
        "__u64" => Some(8),
        _ => None,
    }
}

/// `tp_chan_key` -> `TpChanKey`.
pub fn rust_name(c: &str) -> String {
    c.split('_')
        .map(|w| {
            let mut cs = w.chars();
            match cs.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + cs.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    items: Vec<Item>,
    /// Struct name -> (size, align).
    layouts: HashMap<String, (usize, usize)>,
    /// Constant name -> type.
    consts: HashMap<String, &'static str>,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Result<Token, String> {
        let t = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or_else(|| "unexpected end of the header".to_string())?;
        self.pos += 1;
        Ok(t)
    }

    fn ident(&mut self) -> Result<String, String> {
        let t = self.next()?;
        match t.tok {
            Tok::Ident(s) => Ok(s),
            other => Err(format!("line {}: expected a name, found {other:?}", t.line)),
        }
    }

    fn punct(&mut self, c: char) -> Result<(), String> {
        let t = self.next()?;
        match t.tok {
            Tok::Punct(p) if p == c => Ok(()),
            other => Err(format!("line {}: expected {c:?}, found {other:?}", t.line)),
        }
    }

    /// A comment on `line`, right here: a field's or an enumerator's doc.
    fn trailing_doc(&mut self, line: usize) -> Vec<String> {
        match self.peek() {
            Some(Token {
                tok: Tok::Comment(c),
                line: l,
            }) if *l == line => {
                let c = c.clone();
                self.pos += 1;
                c
            }
            _ => Vec::new(),
        }
    }

    fn parse(mut self) -> Result<Abi, String> {
        let mut doc = Vec::new();
        while let Some(t) = self.peek().cloned() {
            match t.tok {
                Tok::Comment(c) => {
                    self.pos += 1;
                    doc = c;
                }
                Tok::Define(d) => {
                    self.pos += 1;
                    self.define(&d, std::mem::take(&mut doc))
                        .map_err(|e| format!("line {}: {e}", t.line))?;
                }
                Tok::Ident(ref k) if k == "struct" => {
                    self.pos += 1;
                    let s = self.structure(std::mem::take(&mut doc))?;
                    self.items.push(Item::Struct(s));
                }
                Tok::Ident(ref k) if k == "enum" => {
                    self.pos += 1;
                    let e = self.enumeration(std::mem::take(&mut doc))?;
                    self.items.push(Item::Enum(e));
                }
                other => return Err(format!("line {}: unsupported: {other:?}", t.line)),
            }
        }
        Ok(Abi { items: self.items })
    }

    fn define(&mut self, d: &str, doc: Vec<String>) -> Result<(), String> {
        let (d, doc) = match d.split_once("/*") {
            Some((v, c)) => (v.trim(), comment_lines(c.trim_end().trim_end_matches("*/"))),
            None => (d.trim(), doc),
        };
        let (name, value) = match d.split_once(char::is_whitespace) {
            Some((n, v)) => (n, v.trim()),
            None => return Ok(()),
        };
        let mut ty = None;
        let mut expr = value;
        for (cast, t) in [
            ("__u8", "u8"),
            ("__u16", "u16"),
            ("__u32", "u32"),
            ("__u64", "u64"),
        ] {
            let open = format!("(({cast})");
            if let Some(inner) = value.strip_prefix(&open).and_then(|v| v.strip_suffix(')')) {
                ty = Some(t);
                expr = inner.trim();
            }
        }
        // Tokens: literals, constants, operators, parentheses.
        let mut out = String::new();
        let mut wide = false;
        let mut rest = expr;
        while let Some(c) = rest.chars().next() {
            if c.is_whitespace() {
                rest = &rest[1..];
            } else if c.is_ascii_digit() {
                let end = rest
                    .find(|c: char| !c.is_ascii_alphanumeric())
                    .unwrap_or(rest.len());
                let (v, long) = literal(&rest[..end])
                    .ok_or_else(|| format!("{name}: bad literal {}", &rest[..end]))?;
                wide |= long;
                let _ = write!(out, "{v}");
                rest = &rest[end..];
            } else if c.is_ascii_alphabetic() || c == '_' {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let used = &rest[..end];
                let t = self
                    .consts
                    .get(used)
                    .ok_or_else(|| format!("{name}: {used} is not a constant defined before"))?;
                wide |= *t == "u64";
                out.push_str(used);
                rest = &rest[end..];
            } else if let Some(op) = ["<<", ">>", "+", "-", "*", "/", "|", "&", "(", ")"]
                .into_iter()
                .find(|op| rest.starts_with(op))
            {
                if !matches!(op, "(" | ")") {
                    out.push(' ');
                    out.push_str(op);
                    out.push(' ');
                } else {
                    out.push_str(op);
                }
                rest = &rest[op.len()..];
            } else {
                return Err(format!("{name}: unsupported {c:?} in its value"));
            }
        }
        let mut expr = out.trim().replace("( ", "(").replace(" )", ")");
        // C needs the outer parentheses, Rust warns about them.
        while expr.starts_with('(') && expr.ends_with(')') && balanced(&expr[1..expr.len() - 1]) {
            expr = expr[1..expr.len() - 1].trim().to_string();
        }
        if expr.is_empty() {
            return Err(format!("{name}: no value"));
        }
        let ty = ty.unwrap_or(if wide { "u64" } else { "u32" });
        self.consts.insert(name.to_string(), ty);
        self.items.push(Item::Const(Const {
            name: name.to_string(),
            ty,
            expr,
            doc,
        }));
        Ok(())
    }

    fn structure(&mut self, doc: Vec<String>) -> Result<Struct, String> {
        let name = self.ident()?;
        self.punct('{')?;
        let mut fields: Vec<Field> = Vec::new();
        let mut offset = 0;
        let mut align = 1;
        let mut field_doc = Vec::new();
        loop {
            let t = self.next()?;
            let ty_name = match t.tok {
                Tok::Punct('}') => break,
                Tok::Comment(c) => {
                    field_doc = c;
                    continue;
                }
                Tok::Ident(s) => s,
                other => {
                    return Err(format!(
                        "line {}: unsupported in struct {name}: {other:?}",
                        t.line
                    ));
                }
            };
            let (mut ty, mut size, f_align) = if ty_name == "struct" {
                let s = self.ident()?;
                let &(size, align) = self.layouts.get(&s).ok_or_else(|| {
                    format!("line {}: struct {s} is not defined before {name}", t.line)
                })?;
                (Ty::Struct(s), size, align)
            } else {
                let n = int_size(&ty_name).ok_or_else(|| {
                    format!(
                        "line {}: struct {name}: type {ty_name} is not one of __u8, __u16, __u32, __u64 or a struct",
                        t.line
                    )
                })?;
                (Ty::Int(n), n, n)
            };
            let field = self.ident()?;
            let t = self.next()?;
            match t.tok {
                Tok::Punct(';') => {}
                Tok::Punct('[') => {
                    let n = self.next()?;
                    let len = match (&n.tok, &ty) {
                        (Tok::Num(s), Ty::Int(_)) => literal(s).map(|(v, _)| v as usize),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        format!(
                            "line {}: {name}.{field}: arrays are of __uN with a literal length",
                            n.line
                        )
                    })?;
                    self.punct(']')?;
                    self.punct(';')?;
                    ty = Ty::Array(size, len);
                    size *= len;
                }
                other => {
                    return Err(format!(
                        "line {}: {name}.{field}: expected ';' or '[', found {other:?}",
                        t.line
                    ));
                }
            }
            if offset % f_align != 0 {
                return Err(format!(
                    "line {}: struct {name}: {} bytes of implicit padding before {field}: make them an explicit _pad field",
                    t.line,
                    f_align - offset % f_align
                ));
            }
            let mut doc = self.trailing_doc(t.line);
            if doc.is_empty() {
                doc = std::mem::take(&mut field_doc);
            }
            field_doc.clear();
            fields.push(Field {
                name: field,
                ty,
                doc,
                offset,
                size,
            });
            offset += size;
            align = align.max(f_align);
        }
        self.punct(';')?;
        if fields.is_empty() {
            return Err(format!("struct {name} has no fields"));
        }
        if offset % align != 0 {
            return Err(format!(
                "struct {name}: {} bytes of implicit padding at its end: make them an explicit _pad field",
                align - offset % align
            ));
        }
        self.layouts.insert(name.clone(), (offset, align));
        Ok(Struct {
            name,
            doc,
            fields,
            size: offset,
            align,
        })
    }

    fn enumeration(&mut self, doc: Vec<String>) -> Result<Enum, String> {
        let name = self.ident()?;
        self.punct('{')?;
        let mut values: Vec<Enumerator> = Vec::new();
        let mut next = 0u32;
        loop {
            let t = self.next()?;
            let v = match t.tok {
                Tok::Punct('}') => break,
                Tok::Ident(s) => s,
                other => {
                    return Err(format!(
                        "line {}: unsupported in enum {name}: {other:?}",
                        t.line
                    ));
                }
            };
            let mut line = t.line;
            if matches!(self.peek().map(|t| &t.tok), Some(Tok::Punct('='))) {
                self.pos += 1;
                let n = self.next()?;
                line = n.line;
                next = match n.tok {
                    Tok::Num(s) => literal(&s).and_then(|(v, _)| u32::try_from(v).ok()),
                    _ => None,
                }
                .ok_or_else(|| format!("line {line}: {v}: the value must be a literal"))?;
            }
            match self.peek().map(|t| &t.tok) {
                Some(Tok::Punct(',')) => {
                    line = self.peek().map_or(line, |t| t.line);
                    self.pos += 1;
                }
                Some(Tok::Punct('}')) => {}
                other => {
                    return Err(format!(
                        "line {line}: {v}: expected ',' or '}}', found {other:?}"
                    ));
                }
            }
            let doc = self.trailing_doc(line);
            self.consts.insert(v.clone(), "u32");
            values.push(Enumerator {
                name: v,
                value: next,
                doc,
            });
            next = next
                .checked_add(1)
                .ok_or_else(|| format!("line {line}: enum {name} overflows"))?;
        }
        self.punct(';')?;
        Ok(Enum { name, doc, values })
    }
}

fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

fn doc_lines(out: &mut String, indent: &str, first: Option<String>, doc: &[String]) {
    if let Some(f) = first {
        let _ = writeln!(out, "{indent}/// {f}");
        if !doc.is_empty() {
            let _ = writeln!(out, "{indent}///");
        }
    }
    for l in doc {
        // Brackets would be read as intra-doc links.
        let l = l.replace('[', "\\[").replace(']', "\\]");
        let _ = writeln!(out, "{indent}/// {l}");
    }
}

impl Abi {
    /// Reads a header written in the restricted syntax of this module's docs.
    pub fn parse(src: &str) -> Result<Abi, String> {
        Parser {
            toks: lex(src)?,
            pos: 0,
            items: Vec::new(),
            layouts: HashMap::new(),
            consts: HashMap::new(),
        }
        .parse()
    }

    /// The Rust items: for each struct a `#[repr(C)]` struct with `pub(crate)` fields,
    /// an `aya::Pod` impl and `offset_of!`/`size_of`/`align_of` asserts of the layout
    /// computed here; for each constant a `pub(crate) const`; for each enum a `u32`
    /// constant per enumerator and `<ENUM>_NAMES`, the enumerators' names lowercased
    /// without their prefix (see `NAME_PREFIXES`), indexed by value (`TP_STAT_NAMES`).
    pub fn rust(&self) -> String {
        let mut o = String::from(
            "// Generated by dataplane/build.rs from bpf/relay.h (see src/xdp/abi_gen.rs): edit the header.\n\n",
        );
        for item in &self.items {
            match item {
                Item::Struct(s) => {
                    let rs = rust_name(&s.name);
                    doc_lines(
                        &mut o,
                        "",
                        Some(format!("`struct {}` of relay.h.", s.name)),
                        &s.doc,
                    );
                    o.push_str(
                        "#[repr(C)]\n#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]\n",
                    );
                    let _ = writeln!(o, "pub(crate) struct {rs} {{");
                    for f in &s.fields {
                        doc_lines(&mut o, "    ", None, &f.doc);
                        let ty = match &f.ty {
                            Ty::Int(n) => format!("u{}", n * 8),
                            Ty::Array(n, len) => format!("[u{}; {len}]", n * 8),
                            Ty::Struct(c) => rust_name(c),
                        };
                        let _ = writeln!(o, "    pub(crate) {}: {ty},", f.name);
                    }
                    o.push_str("}\n\n");
                    let _ = writeln!(
                        o,
                        "// SAFETY: a `repr(C)` struct of integers, arrays of integers and such structs,\n\
                         // with every padding byte an explicit field (the generator refuses implicit\n\
                         // padding, and the asserts below check the layout): any bit pattern is a valid\n\
                         // value and none has uninitialised bytes.\n\
                         unsafe impl aya::Pod for {rs} {{}}"
                    );
                    let _ = writeln!(
                        o,
                        "const _: () = assert!(core::mem::size_of::<{rs}>() == {});",
                        s.size
                    );
                    let _ = writeln!(
                        o,
                        "const _: () = assert!(core::mem::align_of::<{rs}>() == {});",
                        s.align
                    );
                    for f in &s.fields {
                        let _ = writeln!(
                            o,
                            "const _: () = assert!(core::mem::offset_of!({rs}, {}) == {});",
                            f.name, f.offset
                        );
                    }
                    o.push('\n');
                }
                Item::Const(c) => {
                    doc_lines(
                        &mut o,
                        "",
                        Some(format!("`{}` of relay.h.", c.name)),
                        &c.doc,
                    );
                    let _ = writeln!(o, "pub(crate) const {}: {} = {};\n", c.name, c.ty, c.expr);
                }
                Item::Enum(e) => {
                    let mut names = Vec::new();
                    for (i, v) in e.values.iter().enumerate() {
                        doc_lines(
                            &mut o,
                            "",
                            Some(format!("`{}` of `enum {}` in relay.h.", v.name, e.name)),
                            &v.doc,
                        );
                        let _ = writeln!(o, "pub(crate) const {}: u32 = {};", v.name, v.value);
                        let count = i + 1 == e.values.len() && v.name.ends_with("_MAX");
                        if !count {
                            names.push(v);
                        }
                    }
                    // Indexed by value: the table is complete only when the values are
                    // 0, 1, 2...
                    if names.iter().enumerate().all(|(i, v)| v.value as usize == i) {
                        doc_lines(
                            &mut o,
                            "",
                            Some(format!(
                                "The names of `enum {}`'s enumerators, by value.",
                                e.name
                            )),
                            &e.doc,
                        );
                        let _ = writeln!(
                            o,
                            "pub(crate) const {}_NAMES: [&str; {}] = [",
                            e.name.to_ascii_uppercase(),
                            names.len()
                        );
                        for v in names {
                            let short = NAME_PREFIXES
                                .iter()
                                .find_map(|p| v.name.strip_prefix(p))
                                .unwrap_or(&v.name);
                            let _ = writeln!(o, "    {:?},", short.to_ascii_lowercase());
                        }
                        o.push_str("];\n");
                    }
                    o.push('\n');
                }
            }
        }
        o
    }

    /// A C file of `_Static_assert`s that clang's layout of `header` (a path for
    /// `#include`) is the one computed here, field by field, and that the enumerators
    /// have the values given to Rust.
    pub fn c_check(&self, header: &str) -> String {
        let mut o = format!(
            "/* Generated by dataplane/build.rs: the layout Rust was given is clang's. */\n\
             #include <stddef.h>\n#include \"{header}\"\n\n"
        );
        for item in &self.items {
            match item {
                Item::Struct(s) => {
                    let n = &s.name;
                    let _ = writeln!(
                        o,
                        "_Static_assert(sizeof(struct {n}) == {}, \"struct {n}: size {} in Rust\");",
                        s.size, s.size
                    );
                    let _ = writeln!(
                        o,
                        "_Static_assert(_Alignof(struct {n}) == {}, \"struct {n}: alignment {} in Rust\");",
                        s.align, s.align
                    );
                    for f in &s.fields {
                        let fl = &f.name;
                        let _ = writeln!(
                            o,
                            "_Static_assert(offsetof(struct {n}, {fl}) == {}, \"{n}.{fl}: offset {} in Rust\");",
                            f.offset, f.offset
                        );
                        let _ = writeln!(
                            o,
                            "_Static_assert(sizeof(((struct {n} *)0)->{fl}) == {}, \"{n}.{fl}: size {} in Rust\");",
                            f.size, f.size
                        );
                    }
                }
                Item::Enum(e) => {
                    for v in &e.values {
                        let _ = writeln!(
                            o,
                            "_Static_assert({} == {}, \"{}: {} in Rust\");",
                            v.name, v.value, v.name, v.value
                        );
                    }
                }
                Item::Const(_) => {}
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is how a test fails")]

    use super::*;

    const HEADER: &str = "/* Top. */
#ifndef X_H
#define X_H
#include <linux/types.h>

/* A key. */
struct tp_key {
	__u32 ip; /* network order */
	__u16 port;
	__u8 _pad[2];
};

struct tp_val {
	__u64 deadline_ns;
	struct tp_key key;
	__u32 slot;
	__u32 _pad;
};

#define TP_FLAG ((__u8)1)
#define TP_TTL_NS 100000000ULL
#define TP_CHUNK 256
#define TP_MAX (TP_CHUNK * 36)

/* Counters. */
enum tp_stat {
	TP_RELAYED = 0, /* relayed */
	TP_PASS_NO_ENTRY, /* no entry */
	TP_STAT_MAX,
};
#endif
";

    #[test]
    fn the_layout_is_c_s() {
        let abi = Abi::parse(HEADER).unwrap();
        let rust = abi.rust();
        assert!(rust.contains("pub(crate) struct TpKey {"), "{rust}");
        assert!(
            rust.contains("    /// network order\n    pub(crate) ip: u32,"),
            "{rust}"
        );
        assert!(rust.contains("pub(crate) _pad: [u8; 2],"), "{rust}");
        assert!(rust.contains("pub(crate) key: TpKey,"), "{rust}");
        assert!(rust.contains("size_of::<TpVal>() == 24"), "{rust}");
        assert!(rust.contains("align_of::<TpVal>() == 8"), "{rust}");
        assert!(rust.contains("offset_of!(TpVal, key) == 8"), "{rust}");
        assert!(rust.contains("offset_of!(TpVal, slot) == 16"), "{rust}");
        assert!(rust.contains("pub(crate) const TP_FLAG: u8 = 1;"), "{rust}");
        assert!(
            rust.contains("pub(crate) const TP_TTL_NS: u64 = 100000000;"),
            "{rust}"
        );
        assert!(
            rust.contains("pub(crate) const TP_MAX: u32 = TP_CHUNK * 36;"),
            "{rust}"
        );
        assert!(
            rust.contains("pub(crate) const TP_STAT_MAX: u32 = 2;"),
            "{rust}"
        );
        assert!(
            rust.contains("TP_STAT_NAMES: [&str; 2] = [\n    \"relayed\",\n    \"no_entry\",\n];"),
            "{rust}"
        );
        assert!(!rust.contains("X_H"), "{rust}");
        let c = abi.c_check("x.h");
        assert!(
            c.contains("_Static_assert(offsetof(struct tp_val, slot) == 16,"),
            "{c}"
        );
        assert!(
            c.contains("_Static_assert(sizeof(((struct tp_key *)0)->port) == 2,"),
            "{c}"
        );
        assert!(c.contains("_Static_assert(TP_PASS_NO_ENTRY == 1,"), "{c}");
    }

    #[test]
    fn a_renamed_or_retyped_field_changes_the_rust_side() {
        let renamed = Abi::parse(&HEADER.replace("__u16 port;", "__u16 sport;")).unwrap();
        assert!(renamed.rust().contains("pub(crate) sport: u16,"));
        assert!(!renamed.rust().contains("pub(crate) port: u16,"));
        // A wider port leaves two bytes of padding the header must spell out.
        let retyped = HEADER.replace("__u16 port;", "__u32 port;");
        let e = Abi::parse(&retyped).unwrap_err();
        assert!(
            e.contains("struct tp_key: 2 bytes of implicit padding at its end"),
            "{e}"
        );
        let retyped = retyped.replace("__u8 _pad[2];", "");
        let abi = Abi::parse(&retyped).unwrap();
        assert!(abi.rust().contains("pub(crate) port: u32,"));
        assert!(
            abi.c_check("x.h")
                .contains("((struct tp_key *)0)->port) == 4,")
        );
    }

    /// The real header: a field renamed or retyped there changes the generated struct
    /// the loader uses, so `xdp.rs` stops compiling where it names the field (checked
    /// by hand too: renaming `tp_chan.peer_ip` gives "error\[E0560\]: struct `TpChan`
    /// has no field named `peer_ip`" at xdp.rs, and `tp_perm_key.relay_port` as a `__u32`
    /// "error\[E0308\]: mismatched types").
    #[test]
    fn a_change_in_relay_h_reaches_the_structs_the_loader_uses() {
        const RELAY_H: &str = include_str!("../../bpf/relay.h");
        let rust = Abi::parse(RELAY_H).unwrap().rust();
        let chan = "pub(crate) struct TpChan {\n    pub(crate) deadline_ns: u64,\n    pub(crate) relay_ip: u32,\n    pub(crate) peer_ip: u32,";
        assert!(rust.contains(chan), "{rust}");
        let renamed = RELAY_H.replacen(
            "\t__u32 peer_ip;\n\t__u16 relay_port;\n\t__u16 peer_port;\n\t__u32 slot;",
            "\t__u32 peer_addr;\n\t__u16 relay_port;\n\t__u16 peer_port;\n\t__u32 slot;",
            1,
        );
        assert_ne!(renamed, RELAY_H);
        let rust = Abi::parse(&renamed).unwrap().rust();
        assert!(!rust.contains(chan), "{rust}");
        assert!(rust.contains("pub(crate) peer_addr: u32,"), "{rust}");
        let retyped = RELAY_H.replacen(
            "\t__u16 relay_port;\n\t__u16 _pad;\n};",
            "\t__u32 relay_port;\n};",
            1,
        );
        assert_ne!(retyped, RELAY_H);
        let rust = Abi::parse(&retyped).unwrap().rust();
        assert!(rust.contains("pub(crate) struct TpPermKey {\n    pub(crate) relay_ip: u32,\n    pub(crate) peer_ip: u32,\n    pub(crate) relay_port: u32,\n}"), "{rust}");
    }

    #[test]
    fn what_the_parser_does_not_read_is_refused_with_its_line() {
        let e = Abi::parse("struct tp_a {\n\tint x;\n};").unwrap_err();
        assert!(e.starts_with("line 2: struct tp_a: type int"), "{e}");
        let e = Abi::parse("struct tp_a {\n\t__u8 a;\n\t__u32 b;\n};").unwrap_err();
        assert!(e.contains("3 bytes of implicit padding before b"), "{e}");
        let e = Abi::parse("struct tp_a {\n\tstruct tp_b b;\n};").unwrap_err();
        assert!(e.contains("struct tp_b is not defined before tp_a"), "{e}");
        let e = Abi::parse("#define TP_A (TP_B + 1)").unwrap_err();
        assert!(e.contains("TP_B is not a constant defined before"), "{e}");
        let e = Abi::parse("static int x;").unwrap_err();
        assert!(e.starts_with("line 1: unsupported"), "{e}");
        assert_eq!(rust_name("tp_chan_key6"), "TpChanKey6");
    }
}
