//! The emulator's SOQL subset: a lexer, a recursive-descent parser, a binder
//! that resolves names against an object's schema and types the literals,
//! and an evaluator over stored rows.
//!
//! Supported: `SELECT f, ... FROM Object [WHERE cond] [ORDER BY f [ASC|DESC]
//! [NULLS FIRST|LAST], ...] [LIMIT n]`, with `AND`/`OR`/`NOT`, parentheses,
//! `= != <> < <= > >=`, `IN (...)`, `NOT IN (...)` and `LIKE`. Anything else
//! is rejected at job creation the way Salesforce rejects it: with
//! `MALFORMED_QUERY`, `INVALID_TYPE` or `INVALID_FIELD`.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, Utc};

use super::data::{Kind, Row, Schema, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SoqlError {
    pub code: &'static str,
    pub message: String,
}

impl SoqlError {
    fn malformed(src: &str, pos: usize, what: impl std::fmt::Display) -> SoqlError {
        let (row, column) = row_column(src, pos);
        SoqlError { code: "MALFORMED_QUERY", message: format!("{what} (ERROR at Row:{row}:Column:{column})") }
    }

    fn invalid_field(message: String) -> SoqlError {
        SoqlError { code: "INVALID_FIELD", message }
    }
}

/// 1-based row and column (in characters) of a byte offset, as Salesforce
/// reports positions in SOQL errors.
fn row_column(src: &str, pos: usize) -> (usize, usize) {
    let before = src.get(..pos).unwrap_or(src);
    let row = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (row, column)
}

// ---------------------------------------------------------------- lexer ---

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Date(NaiveDate),
    DateTime(DateTime<Utc>),
    Comma,
    LParen,
    RParen,
    Op(CmpOp),
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

fn lex(src: &str) -> Result<Vec<Token>, SoqlError> {
    let chars: Vec<(usize, char)> = src.char_indices().collect();
    let offset = |i: usize| chars.get(i).map_or(src.len(), |&(o, _)| o);
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(c) = at(i) {
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        let tok = match c {
            ',' => {
                i += 1;
                Tok::Comma
            }
            '(' => {
                i += 1;
                Tok::LParen
            }
            ')' => {
                i += 1;
                Tok::RParen
            }
            '=' => {
                i += 1;
                Tok::Op(CmpOp::Eq)
            }
            '!' if at(i + 1) == Some('=') => {
                i += 2;
                Tok::Op(CmpOp::Ne)
            }
            '<' => match at(i + 1) {
                Some('=') => {
                    i += 2;
                    Tok::Op(CmpOp::Le)
                }
                Some('>') => {
                    i += 2;
                    Tok::Op(CmpOp::Ne)
                }
                _ => {
                    i += 1;
                    Tok::Op(CmpOp::Lt)
                }
            },
            '>' => {
                if at(i + 1) == Some('=') {
                    i += 2;
                    Tok::Op(CmpOp::Ge)
                } else {
                    i += 1;
                    Tok::Op(CmpOp::Gt)
                }
            }
            '\'' => {
                i += 1;
                let mut text = String::new();
                loop {
                    match at(i) {
                        None => {
                            return Err(SoqlError::malformed(src, offset(start), "unterminated string literal"));
                        }
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let escaped = match at(i + 1) {
                                Some('n') => "\n",
                                Some('t') => "\t",
                                Some('r') => "\r",
                                Some('b') => "\u{8}",
                                Some('f') => "\u{c}",
                                Some('"') => "\"",
                                Some('\'') => "'",
                                Some('\\') => "\\",
                                // LIKE escapes stay escaped for the pattern compiler.
                                Some('%') => "\\%",
                                Some('_') => "\\_",
                                _ => {
                                    return Err(SoqlError::malformed(
                                        src,
                                        offset(i),
                                        "invalid escape sequence in string literal",
                                    ));
                                }
                            };
                            text.push_str(escaped);
                            i += 2;
                        }
                        Some(other) => {
                            text.push(other);
                            i += 1;
                        }
                    }
                }
                Tok::Str(text)
            }
            c if c.is_ascii_digit() || ((c == '-' || c == '+') && at(i + 1).is_some_and(|d| d.is_ascii_digit())) => {
                let looks_like_date =
                    (0..4).all(|k| at(i + k).is_some_and(|d| d.is_ascii_digit())) && at(i + 4) == Some('-');
                if looks_like_date {
                    while at(i).is_some_and(|d| d.is_ascii_alphanumeric() || ":.+-".contains(d)) {
                        i += 1;
                    }
                    let text = src.get(offset(start)..offset(i)).unwrap_or_default();
                    date_literal(text).ok_or_else(|| {
                        SoqlError::malformed(src, offset(start), format!("invalid date or dateTime literal: {text}"))
                    })?
                } else {
                    i += 1;
                    while at(i).is_some_and(|d| d.is_ascii_digit() || d == '.') {
                        i += 1;
                    }
                    let text = src.get(offset(start)..offset(i)).unwrap_or_default();
                    let n = text
                        .parse::<f64>()
                        .map_err(|_| SoqlError::malformed(src, offset(start), format!("invalid number: {text}")))?;
                    Tok::Num(n)
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                while at(i).is_some_and(|d| d.is_alphanumeric() || d == '_' || d == '.') {
                    i += 1;
                }
                Tok::Ident(src.get(offset(start)..offset(i)).unwrap_or_default().to_owned())
            }
            other => {
                return Err(SoqlError::malformed(src, offset(start), format!("unexpected character: '{other}'")));
            }
        };
        tokens.push(Token { tok, start: offset(start), end: offset(i) });
    }
    tokens.push(Token { tok: Tok::Eof, start: src.len(), end: src.len() });
    Ok(tokens)
}

/// `YYYY-MM-DD`, or a dateTime `YYYY-MM-DDThh:mm:ss[.fff](Z|±hh:mm)`.
fn date_literal(text: &str) -> Option<Tok> {
    if text.len() == 10 {
        return NaiveDate::parse_from_str(text, "%Y-%m-%d").ok().map(Tok::Date);
    }
    if !text.contains(['T', 't']) {
        return None;
    }
    DateTime::parse_from_rfc3339(text).ok().map(|t| Tok::DateTime(t.with_timezone(&Utc)))
}

// --------------------------------------------------------------- parser ---

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Null,
    Bool(bool),
    Str(String),
    Num(f64),
    Date(NaiveDate),
    DateTime(DateTime<Utc>),
}

#[derive(Debug, Clone)]
struct Name {
    text: String,
    pos: usize,
}

#[derive(Debug, Clone)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp { field: Name, op: CmpOp, lit: Lit },
    In { field: Name, negated: bool, list: Vec<Lit> },
    Like { field: Name, pattern: String },
}

#[derive(Debug, Clone)]
struct OrderItem {
    field: Name,
    descending: bool,
    nulls_first: Option<bool>,
}

#[derive(Debug, Clone)]
struct ParsedQuery {
    fields: Vec<Name>,
    object: Name,
    filter: Option<Expr>,
    order: Vec<OrderItem>,
    limit: Option<usize>,
}

/// Words that end a field list or an expression; using one as a field name
/// is a syntax error, as in SOQL.
const RESERVED: &[&str] = &[
    "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "ORDER", "BY", "LIMIT", "GROUP", "HAVING", "OFFSET",
    "NULL", "TRUE", "FALSE", "WITH", "USING", "FOR", "TYPEOF",
];

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> &Tok {
        self.tokens.get(self.i).map_or(&Tok::Eof, |t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.tokens.get(self.i).map_or(self.src.len(), |t| t.start)
    }

    fn bump(&mut self) -> Tok {
        let tok = self.peek().clone();
        if self.i < self.tokens.len() {
            self.i += 1;
        }
        tok
    }

    fn unexpected(&self) -> SoqlError {
        let shown = match self.tokens.get(self.i) {
            Some(Token { tok: Tok::Eof, .. }) | None => "<EOF>",
            Some(t) => self.src.get(t.start..t.end).unwrap_or("?"),
        };
        SoqlError::malformed(self.src, self.pos(), format!("unexpected token: '{shown}'"))
    }

    fn at_keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(w) if w.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        let found = self.at_keyword(kw);
        if found {
            self.i += 1;
        }
        found
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<(), SoqlError> {
        if self.eat_keyword(kw) { Ok(()) } else { Err(self.unexpected()) }
    }

    fn expect(&mut self, tok: &Tok) -> Result<(), SoqlError> {
        if self.peek() == tok {
            self.i += 1;
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    fn name(&mut self) -> Result<Name, SoqlError> {
        let pos = self.pos();
        match self.peek() {
            Tok::Ident(w) if !RESERVED.iter().any(|r| w.eq_ignore_ascii_case(r)) => {
                let text = w.clone();
                self.i += 1;
                Ok(Name { text, pos })
            }
            _ => Err(self.unexpected()),
        }
    }

    fn query(&mut self) -> Result<ParsedQuery, SoqlError> {
        self.expect_keyword("SELECT")?;
        let mut fields = Vec::new();
        loop {
            let field = self.name()?;
            if self.peek() == &Tok::LParen {
                return Err(SoqlError::malformed(
                    self.src,
                    field.pos,
                    format!("{}() is not supported by Bulk API 2.0 query; select fields by name", field.text),
                ));
            }
            fields.push(field);
            if self.peek() != &Tok::Comma {
                break;
            }
            self.bump();
        }
        self.expect_keyword("FROM")?;
        let object = self.name()?;
        let filter = if self.eat_keyword("WHERE") { Some(self.or_expr()?) } else { None };
        let mut order = Vec::new();
        if self.eat_keyword("ORDER") {
            self.expect_keyword("BY")?;
            loop {
                let field = self.name()?;
                let descending = if self.eat_keyword("DESC") {
                    true
                } else {
                    self.eat_keyword("ASC");
                    false
                };
                let nulls_first = if self.eat_keyword("NULLS") {
                    if self.eat_keyword("FIRST") {
                        Some(true)
                    } else {
                        self.expect_keyword("LAST")?;
                        Some(false)
                    }
                } else {
                    None
                };
                order.push(OrderItem { field, descending, nulls_first });
                if self.peek() != &Tok::Comma {
                    break;
                }
                self.bump();
            }
        }
        let limit = if self.eat_keyword("LIMIT") {
            match self.peek() {
                Tok::Num(n) if *n >= 0.0 && n.fract() == 0.0 && *n <= usize::MAX as f64 => {
                    let n = *n as usize;
                    self.bump();
                    Some(n)
                }
                _ => return Err(self.unexpected()),
            }
        } else {
            None
        };
        if self.peek() != &Tok::Eof {
            return Err(self.unexpected());
        }
        Ok(ParsedQuery { fields, object, filter, order, limit })
    }

    fn or_expr(&mut self) -> Result<Expr, SoqlError> {
        let mut left = self.and_expr()?;
        while self.eat_keyword("OR") {
            let right = self.and_expr()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> Result<Expr, SoqlError> {
        let mut left = self.not_expr()?;
        while self.eat_keyword("AND") {
            let right = self.not_expr()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not_expr(&mut self) -> Result<Expr, SoqlError> {
        if self.eat_keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.not_expr()?)));
        }
        if self.peek() == &Tok::LParen {
            self.bump();
            let inner = self.or_expr()?;
            self.expect(&Tok::RParen)?;
            return Ok(inner);
        }
        let field = self.name()?;
        match self.peek().clone() {
            Tok::Op(op) => {
                self.bump();
                let lit = self.literal()?;
                Ok(Expr::Cmp { field, op, lit })
            }
            Tok::Ident(w) if w.eq_ignore_ascii_case("LIKE") => {
                self.bump();
                match self.bump() {
                    Tok::Str(pattern) => Ok(Expr::Like { field, pattern }),
                    _ => {
                        self.i -= 1;
                        Err(self.unexpected())
                    }
                }
            }
            Tok::Ident(w) if w.eq_ignore_ascii_case("IN") || w.eq_ignore_ascii_case("NOT") => {
                let negated = self.eat_keyword("NOT");
                self.expect_keyword("IN")?;
                self.expect(&Tok::LParen)?;
                let mut list = vec![self.literal()?];
                while self.peek() == &Tok::Comma {
                    self.bump();
                    list.push(self.literal()?);
                }
                self.expect(&Tok::RParen)?;
                Ok(Expr::In { field, negated, list })
            }
            _ => Err(self.unexpected()),
        }
    }

    fn literal(&mut self) -> Result<Lit, SoqlError> {
        let lit = match self.peek() {
            Tok::Str(s) => Lit::Str(s.clone()),
            Tok::Num(n) => Lit::Num(*n),
            Tok::Date(d) => Lit::Date(*d),
            Tok::DateTime(t) => Lit::DateTime(*t),
            Tok::Ident(w) if w.eq_ignore_ascii_case("null") => Lit::Null,
            Tok::Ident(w) if w.eq_ignore_ascii_case("true") => Lit::Bool(true),
            Tok::Ident(w) if w.eq_ignore_ascii_case("false") => Lit::Bool(false),
            _ => return Err(self.unexpected()),
        };
        self.bump();
        Ok(lit)
    }
}

fn parse(src: &str) -> Result<ParsedQuery, SoqlError> {
    let tokens = lex(src)?;
    Parser { src, tokens, i: 0 }.query()
}

// --------------------------------------------------------------- binder ---

/// A literal typed for the field it is compared with.
#[derive(Debug, Clone, PartialEq)]
enum Bound {
    Null,
    /// Lower-cased, because SOQL compares text case-insensitively.
    Text(String),
    Id(String),
    Bool(bool),
    Num(f64),
    Date(NaiveDate),
    DateTime(DateTime<Utc>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LikePart {
    Any,
    One,
    Char(char),
}

#[derive(Debug, Clone)]
enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Cmp { col: usize, op: CmpOp, lit: Bound },
    In { col: usize, negated: bool, list: Vec<Bound> },
    Like { col: usize, pattern: Vec<LikePart> },
}

#[derive(Debug, Clone)]
struct OrderKey {
    col: usize,
    kind: Kind,
    descending: bool,
    nulls_first: bool,
}

/// A query checked against an object's schema, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct BoundQuery {
    /// Canonical object name (`Account`, whatever case the query used).
    pub object: &'static str,
    /// Result header: the field names as written in the SELECT.
    pub header: Vec<String>,
    /// Schema positions of the selected fields, in SELECT order; a
    /// relationship field (`Owner.Email`) is `schema width + its index in
    /// `joins``, a column the job appends to each result row.
    pub columns: Vec<usize>,
    pub joins: Vec<Join>,
    filter: Option<Cond>,
    order: Vec<OrderKey>,
    limit: Option<usize>,
}

/// A child-to-parent field in the SELECT: the value of `parent_col` in the
/// `parent` row whose Id is in `fk_col` (null when the lookup is null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Join {
    pub fk_col: usize,
    pub parent: &'static str,
    pub parent_col: usize,
}

/// Parses `src` and binds it to the schema `find_schema` returns for its
/// FROM object (and for the parents of relationship fields).
pub(crate) fn compile<'s>(
    src: &str,
    find_schema: impl Fn(&str) -> Option<&'s Schema>,
) -> Result<BoundQuery, SoqlError> {
    let parsed = parse(src)?;
    let schema = find_schema(&parsed.object.text).ok_or_else(|| SoqlError {
        code: "INVALID_TYPE",
        message: format!("sObject type '{}' is not supported.", parsed.object.text),
    })?;
    let binder = Binder { schema };

    let mut header: Vec<String> = Vec::with_capacity(parsed.fields.len());
    let mut columns = Vec::with_capacity(parsed.fields.len());
    let mut joins = Vec::new();
    for field in &parsed.fields {
        let col = match field.text.split_once('.') {
            Some((relationship, parent_field)) => {
                let join = binder.join(relationship, parent_field, &find_schema)?;
                joins.push(join);
                schema.fields.len() + joins.len() - 1
            }
            None => binder.column(field)?,
        };
        if columns.contains(&col) || header.iter().any(|h| h.eq_ignore_ascii_case(&field.text)) {
            return Err(SoqlError::malformed(src, field.pos, format!("duplicate field selected: {}", field.text)));
        }
        header.push(field.text.clone());
        columns.push(col);
    }
    let filter = parsed.filter.as_ref().map(|e| binder.cond(e)).transpose()?;
    let order = parsed
        .order
        .iter()
        .map(|item| {
            let col = binder.column(&item.field)?;
            Ok(OrderKey {
                col,
                kind: binder.kind(col),
                descending: item.descending,
                // SOQL's default: nulls first ascending, last descending.
                nulls_first: item.nulls_first.unwrap_or(!item.descending),
            })
        })
        .collect::<Result<Vec<_>, SoqlError>>()?;
    Ok(BoundQuery { object: schema.name, header, columns, joins, filter, order, limit: parsed.limit })
}

struct Binder<'s> {
    schema: &'s Schema,
}

impl<'s> Binder<'s> {
    /// Resolves `Relationship.Field` (one level, as the lookups the sandbox
    /// models go one level).
    fn join(
        &self,
        relationship: &str,
        parent_field: &str,
        find_schema: &impl Fn(&str) -> Option<&'s Schema>,
    ) -> Result<Join, SoqlError> {
        let not_understood = || {
            SoqlError::invalid_field(format!(
                "Didn't understand relationship '{relationship}' in field path. If you are \
                 attempting to use a custom relationship, be sure to append the '__r' after the \
                 custom relationship name. Please reference your WSDL or the describe call for \
                 the appropriate names."
            ))
        };
        let (fk_col, target) = self
            .schema
            .fields
            .iter()
            .enumerate()
            .find_map(|(i, f)| {
                super::generate::lookup_target(f.name)
                    .filter(|(rel, _)| rel.eq_ignore_ascii_case(relationship))
                    .map(|(_, target)| (i, target))
            })
            .ok_or_else(not_understood)?;
        let parent = find_schema(target).ok_or_else(not_understood)?;
        if parent_field.contains('.') {
            return Err(not_understood());
        }
        let parent_col = parent.index_of(parent_field).ok_or_else(|| {
            SoqlError::invalid_field(format!(
                "No such column '{parent_field}' on entity '{}'. If you are attempting to use a \
                 custom field, be sure to append the '__c' after the custom field name. Please \
                 reference your WSDL or the describe call for the appropriate names.",
                parent.name
            ))
        })?;
        Ok(Join { fk_col, parent: parent.name, parent_col })
    }

    fn column(&self, name: &Name) -> Result<usize, SoqlError> {
        if let Some((relationship, _)) = name.text.split_once('.') {
            return Err(SoqlError::invalid_field(format!(
                "Didn't understand relationship '{relationship}' in field path. If you are \
                 attempting to use a custom relationship, be sure to append the '__r' after the \
                 custom relationship name. Please reference your WSDL or the describe call for \
                 the appropriate names."
            )));
        }
        self.schema.index_of(&name.text).ok_or_else(|| {
            SoqlError::invalid_field(format!(
                "No such column '{}' on entity '{}'. If you are attempting to use a custom \
                 field, be sure to append the '__c' after the custom field name. Please \
                 reference your WSDL or the describe call for the appropriate names.",
                name.text, self.schema.name
            ))
        })
    }

    fn kind(&self, col: usize) -> Kind {
        self.schema.fields.get(col).map_or(Kind::Text, |f| f.ftype.kind())
    }

    fn literal(&self, col: usize, lit: &Lit) -> Result<Bound, SoqlError> {
        let bound = match (self.kind(col), lit) {
            (_, Lit::Null) => Some(Bound::Null),
            (Kind::Text, Lit::Str(s)) => Some(Bound::Text(lower(s))),
            (Kind::Id, Lit::Str(s)) => Some(Bound::Id(s.clone())),
            (Kind::Bool, Lit::Bool(b)) => Some(Bound::Bool(*b)),
            (Kind::Number, Lit::Num(n)) => Some(Bound::Num(*n)),
            (Kind::Date, Lit::Date(d)) => Some(Bound::Date(*d)),
            (Kind::DateTime, Lit::DateTime(t)) => Some(Bound::DateTime(*t)),
            _ => None,
        };
        bound.ok_or_else(|| {
            let field = self.schema.fields.get(col);
            let name = field.map_or("?", |f| f.name);
            let type_name = field.map_or("string", |f| f.ftype.soql_type_name());
            let quoted = matches!(self.kind(col), Kind::Text | Kind::Id);
            SoqlError::invalid_field(format!(
                "value of filter criterion for field '{name}' must be of type {type_name} and \
                 should {}be enclosed in quotes",
                if quoted { "" } else { "not " }
            ))
        })
    }

    fn cond(&self, expr: &Expr) -> Result<Cond, SoqlError> {
        Ok(match expr {
            Expr::And(a, b) => Cond::And(Box::new(self.cond(a)?), Box::new(self.cond(b)?)),
            Expr::Or(a, b) => Cond::Or(Box::new(self.cond(a)?), Box::new(self.cond(b)?)),
            Expr::Not(a) => Cond::Not(Box::new(self.cond(a)?)),
            Expr::Cmp { field, op, lit } => {
                let col = self.column(field)?;
                Cond::Cmp { col, op: *op, lit: self.literal(col, lit)? }
            }
            Expr::In { field, negated, list } => {
                let col = self.column(field)?;
                Cond::In {
                    col,
                    negated: *negated,
                    list: list.iter().map(|l| self.literal(col, l)).collect::<Result<_, _>>()?,
                }
            }
            Expr::Like { field, pattern } => {
                let col = self.column(field)?;
                if !matches!(self.kind(col), Kind::Text | Kind::Id) {
                    return Err(SoqlError::invalid_field(format!(
                        "invalid operator on field '{}': LIKE applies only to text fields",
                        field.text
                    )));
                }
                Cond::Like { col, pattern: like_pattern(pattern) }
            }
        })
    }
}

fn lower(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

fn like_pattern(pattern: &str) -> Vec<LikePart> {
    let mut parts = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        parts.push(match c {
            '%' => LikePart::Any,
            '_' => LikePart::One,
            '\\' => match chars.next() {
                Some(escaped) => LikePart::Char(escaped),
                None => LikePart::Char('\\'),
            },
            c => LikePart::Char(c),
        });
    }
    // Lower-case after escape handling so `\%` stays a literal percent.
    parts
        .into_iter()
        .flat_map(|p| match p {
            LikePart::Char(c) => c.to_lowercase().map(LikePart::Char).collect::<Vec<_>>(),
            other => vec![other],
        })
        .collect()
}

// ------------------------------------------------------------ evaluator ---

fn cmp_text_ci(value: &str, lowered: &str) -> Ordering {
    value.chars().flat_map(char::to_lowercase).cmp(lowered.chars())
}

/// Ids compare exactly; a 15-character literal matches the 18-character
/// form of the same id, as Salesforce allows.
fn cmp_id(value: &str, literal: &str) -> Ordering {
    if literal.len() == 15 && value.len() == 18 {
        value.as_bytes().get(..15).unwrap_or_default().cmp(literal.as_bytes())
    } else {
        value.cmp(literal)
    }
}

fn compare(value: &Value, lit: &Bound) -> Option<Ordering> {
    match (value, lit) {
        (Value::Text(s), Bound::Text(l)) => Some(cmp_text_ci(s, l)),
        (Value::Text(s), Bound::Id(l)) => Some(cmp_id(s, l)),
        (Value::Bool(a), Bound::Bool(b)) => Some(a.cmp(b)),
        (v, Bound::Num(n)) => v.as_f64().and_then(|x| x.partial_cmp(n)),
        (Value::Date(a), Bound::Date(b)) => Some(a.cmp(b)),
        (Value::DateTime(a), Bound::DateTime(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// SOQL null semantics: `= null` matches nulls, `!= null` non-nulls; a null
/// field is "not equal" to any value and fails every ordering comparison.
fn eval_cmp(value: Option<&Value>, op: CmpOp, lit: &Bound) -> bool {
    match (value, lit) {
        (None, Bound::Null) => op == CmpOp::Eq,
        (Some(_), Bound::Null) => op == CmpOp::Ne,
        (None, _) => op == CmpOp::Ne,
        (Some(v), lit) => compare(v, lit).is_some_and(|ord| op.holds(ord)),
    }
}

fn like_matches(text: &str, pattern: &[LikePart]) -> bool {
    let text: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    // Greedy wildcard matching with backtracking to the last `%`.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(LikePart::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(LikePart::One) => {
                t += 1;
                p += 1;
            }
            Some(LikePart::Char(c)) if text.get(t) == Some(c) => {
                t += 1;
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern.get(p..).unwrap_or_default().iter().all(|part| *part == LikePart::Any)
}

impl Cond {
    fn eval(&self, row: &[Option<Value>]) -> bool {
        let field = |col: &usize| row.get(*col).and_then(Option::as_ref);
        match self {
            Cond::And(a, b) => a.eval(row) && b.eval(row),
            Cond::Or(a, b) => a.eval(row) || b.eval(row),
            Cond::Not(a) => !a.eval(row),
            Cond::Cmp { col, op, lit } => eval_cmp(field(col), *op, lit),
            Cond::In { col, negated, list } => {
                let found = list.iter().any(|lit| eval_cmp(field(col), CmpOp::Eq, lit));
                found != *negated
            }
            Cond::Like { col, pattern } => match field(col) {
                Some(Value::Text(s)) => like_matches(s, pattern),
                _ => false,
            },
        }
    }
}

fn order_values(kind: Kind, a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Text(x), Value::Text(y)) if kind == Kind::Text => {
            x.chars().flat_map(char::to_lowercase).cmp(y.chars().flat_map(char::to_lowercase)).then_with(|| x.cmp(y))
        }
        (Value::Text(x), Value::Text(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Date(x), Value::Date(y)) => x.cmp(y),
        (Value::DateTime(x), Value::DateTime(y)) => x.cmp(y),
        (x, y) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => Ordering::Equal,
        },
    }
}

impl BoundQuery {
    pub(crate) fn matches(&self, row: &[Option<Value>]) -> bool {
        self.filter.as_ref().is_none_or(|c| c.eval(row))
    }

    /// Runs the query over `rows`; `visible` decides which rows the operation
    /// may see at all (query hides soft-deleted rows, queryAll doesn't).
    pub(crate) fn execute(&self, rows: &[Row], visible: impl Fn(&Row) -> bool) -> Vec<Row> {
        let hits = rows.iter().filter(|r| visible(r) && self.matches(r)).cloned();
        if self.order.is_empty() {
            return match self.limit {
                Some(n) => hits.take(n).collect(),
                None => hits.collect(),
            };
        }
        let mut out: Vec<Row> = hits.collect();
        out.sort_by(|a, b| self.compare_rows(a, b));
        if let Some(n) = self.limit {
            out.truncate(n);
        }
        out
    }

    fn compare_rows(&self, a: &Row, b: &Row) -> Ordering {
        for key in &self.order {
            let av = a.get(key.col).and_then(Option::as_ref);
            let bv = b.get(key.col).and_then(Option::as_ref);
            let ord = match (av, bv) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) if key.nulls_first => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) if key.nulls_first => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => {
                    let ord = order_values(key.kind, x, y);
                    if key.descending { ord.reverse() } else { ord }
                }
            };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        Ordering::Equal
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;

    use super::super::data::{Field, FieldType};
    use super::*;

    fn schema() -> Schema {
        let f = |name, ftype| Field { name, label: name, ftype, nillable: true, picklist: &[] };
        Schema {
            name: "Account",
            key_prefix: "001",
            fields: vec![
                f("Id", FieldType::Id),
                f("Name", FieldType::String),
                f("AnnualRevenue", FieldType::Currency),
                f("SystemModstamp", FieldType::DateTime),
                f("IsDeleted", FieldType::Boolean),
                f("CustomerSince__c", FieldType::Date),
            ],
        }
    }

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 1, 1, h, m, 0).unwrap()
    }

    fn rows() -> Vec<Row> {
        let row = |id: &str, name: Option<&str>, rev: Option<i64>, t: DateTime<Utc>, del: bool| {
            Arc::from(vec![
                Some(Value::text(id)),
                name.map(Value::text),
                rev.map(|units| Value::Decimal { units, scale: 2 }),
                Some(Value::DateTime(t)),
                Some(Value::Bool(del)),
                Some(Value::Date(t.date_naive())),
            ])
        };
        vec![
            row("001000000000001AAA", Some("Acme"), Some(10_000), at(0, 0), false),
            row("001000000000002AAA", Some("acme corp"), None, at(1, 0), false),
            row("001000000000003AAA", Some("Globex"), Some(500_000), at(2, 0), true),
            row("001000000000004AAA", None, Some(25_000), at(3, 0), false),
            row("001000000000005AAA", Some("O'Brien 100%"), Some(1), at(4, 30), false),
        ]
    }

    fn run(q: &str) -> Result<Vec<String>, SoqlError> {
        let s = schema();
        let bound = compile(q, |name| name.eq_ignore_ascii_case("account").then_some(&s))?;
        Ok(bound
            .execute(&rows(), |_| true)
            .iter()
            .map(|r| match &r[0] {
                Some(Value::Text(id)) => id[12..15].to_string(),
                _ => String::new(),
            })
            .collect())
    }

    #[test]
    fn datetime_window_compares_instants() {
        let q = "SELECT Id FROM Account WHERE SystemModstamp >= 2024-01-01T01:00:00Z \
                 AND SystemModstamp < 2024-01-01T04:30:00.000+00:00";
        assert_eq!(run(q).unwrap(), ["002", "003", "004"]);
        // The same instant written with an offset.
        let q = "select id from account where SystemModstamp > 2024-01-01T05:00:00+03:00";
        assert_eq!(run(q).unwrap(), ["004", "005"]);
    }

    #[test]
    fn where_clause_operators_and_null_semantics() {
        assert_eq!(run("SELECT Id FROM Account WHERE Name = 'ACME'").unwrap(), ["001"]);
        assert_eq!(run("SELECT Id FROM Account WHERE Name LIKE 'acme%'").unwrap(), ["001", "002"]);
        assert_eq!(run("SELECT Id FROM Account WHERE Name LIKE '%\\%'").unwrap(), ["005"]);
        assert_eq!(run("SELECT Id FROM Account WHERE Name = 'O\\'Brien 100%'").unwrap(), ["005"]);
        assert_eq!(run("SELECT Id FROM Account WHERE Name = null").unwrap(), ["004"]);
        assert_eq!(run("SELECT Id FROM Account WHERE AnnualRevenue != null").unwrap().len(), 4);
        assert_eq!(run("SELECT Id FROM Account WHERE AnnualRevenue > 99.5").unwrap(), ["001", "003", "004"]);
        assert_eq!(run("SELECT Id FROM Account WHERE Name != 'acme'").unwrap(), ["002", "003", "004", "005"]);
        assert_eq!(
            run("SELECT Id FROM Account WHERE Name IN ('globex', 'Acme') OR (IsDeleted = false \
                 AND NOT AnnualRevenue < 200)")
            .unwrap(),
            // 002's null revenue fails `< 200`, so NOT makes it match.
            ["001", "002", "003", "004"]
        );
        assert_eq!(
            run("SELECT Id FROM Account WHERE Id NOT IN ('001000000000001', '001000000000002AAA')").unwrap(),
            ["003", "004", "005"]
        );
        assert_eq!(run("SELECT Id FROM Account WHERE CustomerSince__c = 2024-01-01").unwrap().len(), 5);
    }

    #[test]
    fn order_by_and_limit() {
        assert_eq!(run("SELECT Id FROM Account ORDER BY AnnualRevenue DESC LIMIT 3").unwrap(), ["003", "004", "001"]);
        assert_eq!(
            run("SELECT Id FROM Account ORDER BY Name ASC NULLS LAST").unwrap(),
            ["001", "002", "003", "005", "004"]
        );
        assert_eq!(run("SELECT Id FROM Account LIMIT 2").unwrap(), ["001", "002"]);
    }

    #[test]
    fn header_keeps_names_as_written() {
        let s = schema();
        let bound = compile("SELECT id, NAME FROM account", |_| Some(&s)).unwrap();
        assert_eq!(bound.header, ["id", "NAME"]);
        assert_eq!(bound.columns, [0, 1]);
        assert_eq!(bound.object, "Account");
    }

    #[test]
    fn unknown_names_are_rejected_like_salesforce() {
        let err = run("SELECT Id, BadField FROM Account").unwrap_err();
        assert_eq!(err.code, "INVALID_FIELD");
        assert!(err.message.starts_with("No such column 'BadField' on entity 'Account'."));
        let err = run("SELECT Id FROM Foo").unwrap_err();
        assert_eq!(err.code, "INVALID_TYPE");
        assert_eq!(err.message, "sObject type 'Foo' is not supported.");
        let err = run("SELECT Id FROM Account WHERE Nope = 1").unwrap_err();
        assert_eq!(err.code, "INVALID_FIELD");
        let err = run("SELECT Owner.Name FROM Account").unwrap_err();
        assert_eq!(err.code, "INVALID_FIELD");
        let err = run("SELECT Id FROM Account WHERE SystemModstamp > '2024-01-01'").unwrap_err();
        assert_eq!(err.code, "INVALID_FIELD");
        assert!(err.message.contains("dateTime"), "{}", err.message);
        let err = run("SELECT Id FROM Account WHERE Name = 5").unwrap_err();
        assert_eq!(err.code, "INVALID_FIELD");
    }

    #[test]
    fn syntax_errors_are_malformed_query() {
        for q in [
            "",
            "SELECT FROM Account",
            "SELECT Id Account",
            "SELECT Id FROM Account WHERE",
            "SELECT Id FROM Account WHERE Name = 'open",
            "SELECT Id FROM Account WHERE (Name = 'a'",
            "SELECT Id FROM Account LIMIT -1",
            "SELECT Id FROM Account GROUP BY Id",
            "SELECT COUNT() FROM Account",
            "SELECT Id FROM Account WHERE SystemModstamp > 2024-13-01T00:00:00Z",
            "SELECT Id, Id FROM Account",
            "SELECT Id FROM Account WHERE Name = 'a' #",
        ] {
            let err = run(q).unwrap_err();
            assert_eq!(err.code, "MALFORMED_QUERY", "{q}: {err:?}");
        }
        let err = run("SELECT Id FROM Account WHERE").unwrap_err();
        assert_eq!(err.message, "unexpected token: '<EOF>' (ERROR at Row:1:Column:29)");
    }

    #[test]
    fn like_wildcards() {
        let p = like_pattern("a_c%");
        assert!(like_matches("ABCdef", &p));
        assert!(!like_matches("ac", &p));
        assert!(like_matches("x%y", &like_pattern("%\\%%")));
        assert!(!like_matches("xy", &like_pattern("%\\%%")));
        assert!(like_matches("", &like_pattern("%")));
    }
}
