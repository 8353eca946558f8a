//! A job's `where`: checked to be one SOQL boolean condition, so that the
//! parentheses nightjar puts around it hold. `x = 1) OR (Id != null` would
//! otherwise close them and OR itself past the incremental window, and
//! every run would extract the whole object.
//!
//! This is a checker, not a SOQL implementation: it accepts the condition
//! grammar of SOQL's WHERE (comparisons, LIKE, IN / NOT IN with values or a
//! semi-join, INCLUDES / EXCLUDES, AND / OR / NOT, parentheses, literals of
//! every kind) and refuses everything else. It is a pure function over
//! untrusted text (a fuzz target calls it): no panics, bounded nesting.

use super::identifiers::{salesforce_field_path, salesforce_name};

/// Parentheses, NOTs and semi-joins nested deeper than this are refused:
/// no real condition needs them, and the checker recurses once per level.
pub const MAX_DEPTH: usize = 32;

/// Checks that `text` is one SOQL condition, as the body of a WHERE.
pub fn check_condition(text: &str) -> Result<(), String> {
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err("the condition is empty".into());
    }
    let mut parser = Parser { tokens, pos: 0 };
    parser.condition(0)?;
    match parser.peek() {
        None => Ok(()),
        Some(t) if t.kind == Kind::Close => Err(format!(
            "`)` at character {} closes a parenthesis the condition did not open; a `where` must stay one condition inside its own parentheses",
            t.at
        )),
        Some(t) => Err(format!("unexpected {} at character {} after a complete condition", t.show(), t.at)),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// A name, keyword or date literal (`LAST_N_DAYS:7` is one token).
    Word(String),
    Str,
    Number,
    Date,
    DateTime,
    Op(&'static str),
    Open,
    Close,
    Comma,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// 1-based character position, for messages.
    at: usize,
}

impl Token {
    fn show(&self) -> String {
        match &self.kind {
            Kind::Word(w) => format!("`{w}`"),
            Kind::Str => "a string".into(),
            Kind::Number => "a number".into(),
            Kind::Date => "a date".into(),
            Kind::DateTime => "a date-time".into(),
            Kind::Op(op) => format!("`{op}`"),
            Kind::Open => "`(`".into(),
            Kind::Close => "`)`".into(),
            Kind::Comma => "`,`".into(),
        }
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(&self.kind, Kind::Word(w) if w.eq_ignore_ascii_case(keyword))
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = i + 1;
        let push = |tokens: &mut Vec<Token>, kind| tokens.push(Token { kind, at });
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' {
            push(&mut tokens, Kind::Open);
            i += 1;
        } else if c == ')' {
            push(&mut tokens, Kind::Close);
            i += 1;
        } else if c == ',' {
            push(&mut tokens, Kind::Comma);
            i += 1;
        } else if c == '\'' {
            i = string_end(&chars, i)?;
            push(&mut tokens, Kind::Str);
        } else if let Some(op) = operator(&chars[i..]) {
            push(&mut tokens, Kind::Op(op));
            i += op.len();
        } else if c.is_ascii_digit() || ((c == '-' || c == '+') && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | ':' | '-' | '+')) {
                i += 1;
            }
            let literal: String = chars[start..i].iter().collect();
            push(&mut tokens, literal_kind(&literal, at)?);
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.')) {
                i += 1;
            }
            // Date literals with a count: `LAST_N_DAYS:7`.
            if chars.get(i) == Some(&':') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            push(&mut tokens, Kind::Word(chars[start..i].iter().collect()));
        } else {
            return Err(format!(
                "`{}` at character {at} is not part of a SOQL condition{}",
                c.escape_debug(),
                match c {
                    ';' => "; a `where` is one condition, not a statement",
                    ':' => "; bind variables exist only in Apex",
                    '"' => "; SOQL strings are in single quotes",
                    _ => "",
                }
            ));
        }
    }
    Ok(tokens)
}

fn operator(rest: &[char]) -> Option<&'static str> {
    let two: String = rest.iter().take(2).collect();
    for op in ["!=", "<>", "<=", ">="] {
        if two == op {
            return Some(op);
        }
    }
    match rest.first() {
        Some('=') => Some("="),
        Some('<') => Some("<"),
        Some('>') => Some(">"),
        _ => None,
    }
}

/// The index just past the string literal that starts at `start`.
fn string_end(chars: &[char], start: usize) -> Result<usize, String> {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\'' => return Ok(i + 1),
            '\\' => {
                match chars.get(i + 1) {
                    Some('n' | 'N' | 'r' | 'R' | 't' | 'T' | 'b' | 'B' | 'f' | 'F' | '"' | '\'' | '\\' | '_' | '%') => {
                    }
                    Some('u') => {
                        let hex = chars.get(i + 2..i + 6).unwrap_or(&[]);
                        if hex.len() != 4 || !hex.iter().all(char::is_ascii_hexdigit) {
                            return Err(format!("`\\u` at character {} needs four hex digits", i + 1));
                        }
                        i += 4;
                    }
                    Some(other) => {
                        return Err(format!(
                            "`\\{}` at character {} is not a SOQL escape (\\' \\\\ \\n \\r \\t \\b \\f \\\" \\_ \\% \\uXXXX)",
                            other.escape_debug(),
                            i + 1
                        ));
                    }
                    None => break,
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    Err(format!("the string that starts at character {} is not closed with `'`", start + 1))
}

fn literal_kind(literal: &str, at: usize) -> Result<Kind, String> {
    let digits = literal.trim_start_matches(['-', '+']);
    let is_number = {
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
        !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
            && !fraction.is_empty()
            && fraction.bytes().all(|b| b.is_ascii_digit())
    };
    if is_number {
        return Ok(Kind::Number);
    }
    if literal.starts_with(|c: char| c.is_ascii_digit()) {
        if chrono::NaiveDate::parse_from_str(literal, "%Y-%m-%d").is_ok() && literal.len() == 10 {
            return Ok(Kind::Date);
        }
        if literal.contains('T') && chrono::DateTime::parse_from_rfc3339(literal).is_ok() {
            return Ok(Kind::DateTime);
        }
        if literal.contains('T') && chrono::DateTime::parse_from_str(literal, "%Y-%m-%dT%H:%M:%S%.f%z").is_ok() {
            return Ok(Kind::DateTime);
        }
    }
    Err(format!(
        "`{literal}` at character {at} is not a number, a date (2024-01-31) or a date-time with a zone (2024-01-31T00:00:00Z)"
    ))
}

/// Date literals without a count (`TODAY`) and with one (`LAST_N_DAYS:7`).
const DATE_LITERALS: &[&str] = &[
    "YESTERDAY",
    "TODAY",
    "TOMORROW",
    "LAST_WEEK",
    "THIS_WEEK",
    "NEXT_WEEK",
    "LAST_MONTH",
    "THIS_MONTH",
    "NEXT_MONTH",
    "LAST_90_DAYS",
    "NEXT_90_DAYS",
    "THIS_QUARTER",
    "LAST_QUARTER",
    "NEXT_QUARTER",
    "THIS_YEAR",
    "LAST_YEAR",
    "NEXT_YEAR",
    "THIS_FISCAL_QUARTER",
    "LAST_FISCAL_QUARTER",
    "NEXT_FISCAL_QUARTER",
    "THIS_FISCAL_YEAR",
    "LAST_FISCAL_YEAR",
    "NEXT_FISCAL_YEAR",
];
const COUNTED_DATE_LITERALS: &[&str] = &[
    "LAST_N_DAYS",
    "NEXT_N_DAYS",
    "N_DAYS_AGO",
    "LAST_N_WEEKS",
    "NEXT_N_WEEKS",
    "N_WEEKS_AGO",
    "LAST_N_MONTHS",
    "NEXT_N_MONTHS",
    "N_MONTHS_AGO",
    "LAST_N_QUARTERS",
    "NEXT_N_QUARTERS",
    "N_QUARTERS_AGO",
    "LAST_N_YEARS",
    "NEXT_N_YEARS",
    "N_YEARS_AGO",
    "LAST_N_FISCAL_QUARTERS",
    "NEXT_N_FISCAL_QUARTERS",
    "N_FISCAL_QUARTERS_AGO",
    "LAST_N_FISCAL_YEARS",
    "NEXT_N_FISCAL_YEARS",
    "N_FISCAL_YEARS_AGO",
];

/// Words that end an operand or start a clause, never a field.
const KEYWORDS: &[&str] =
    &["AND", "OR", "NOT", "LIKE", "IN", "INCLUDES", "EXCLUDES", "NULL", "TRUE", "FALSE", "SELECT", "FROM", "WHERE"];

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self, expected: &str) -> Result<Token, String> {
        match self.tokens.get(self.pos) {
            Some(t) => {
                self.pos += 1;
                Ok(t.clone())
            }
            None => Err(format!("the condition ends where {expected} was expected")),
        }
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        if self.peek().is_some_and(|t| t.is_keyword(keyword)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, kind: Kind, expected: &str) -> Result<(), String> {
        let t = self.next(expected)?;
        if t.kind == kind { Ok(()) } else { Err(unexpected(&t, expected)) }
    }

    /// Operands joined by AND or by OR; SOQL refuses both at one level
    /// without parentheses, so this does too.
    fn condition(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("the condition nests deeper than {MAX_DEPTH} levels"));
        }
        self.operand(depth)?;
        let mut joiner: Option<&'static str> = None;
        loop {
            let word = match self.peek() {
                Some(t) if t.is_keyword("AND") => "AND",
                Some(t) if t.is_keyword("OR") => "OR",
                _ => return Ok(()),
            };
            let at = self.peek().map_or(0, |t| t.at);
            match joiner {
                Some(j) if j != word => {
                    return Err(format!(
                        "`{word}` at character {at} follows `{j}` at the same level; SOQL needs parentheses to mix AND and OR"
                    ));
                }
                _ => joiner = Some(word),
            }
            self.pos += 1;
            self.operand(depth)?;
        }
    }

    fn operand(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("the condition nests deeper than {MAX_DEPTH} levels"));
        }
        if self.eat_keyword("NOT") {
            return self.operand(depth + 1);
        }
        if self.peek().is_some_and(|t| t.kind == Kind::Open) {
            self.pos += 1;
            self.condition(depth + 1)?;
            return self.expect(Kind::Close, "`)`");
        }
        self.comparison(depth)
    }

    /// `field op value`, `field [NOT] LIKE 'x'`, `field [NOT] IN (...)`,
    /// `field INCLUDES|EXCLUDES ('a;b', ...)`.
    fn comparison(&mut self, depth: usize) -> Result<(), String> {
        self.field(depth)?;
        let t = self.next("an operator (=, !=, <, <=, >, >=, LIKE, IN, NOT IN, INCLUDES, EXCLUDES)")?;
        match &t.kind {
            Kind::Op(op) => {
                let value = self.next("a value")?;
                let ordered = matches!(*op, "<" | "<=" | ">" | ">=");
                match &value.kind {
                    Kind::Word(w) if w.eq_ignore_ascii_case("null") && ordered => {
                        Err(format!("`{op} null` at character {} never matches; use `=` or `!=` with null", value.at))
                    }
                    _ => self.value(&value),
                }
            }
            Kind::Word(w) if w.eq_ignore_ascii_case("LIKE") => self.string(),
            Kind::Word(w) if w.eq_ignore_ascii_case("NOT") => {
                if self.eat_keyword("LIKE") {
                    self.string()
                } else if self.eat_keyword("IN") {
                    self.list(depth, true)
                } else {
                    let t = self.next("LIKE or IN after NOT")?;
                    Err(unexpected(&t, "LIKE or IN after NOT"))
                }
            }
            Kind::Word(w) if w.eq_ignore_ascii_case("IN") => self.list(depth, true),
            Kind::Word(w) if w.eq_ignore_ascii_case("INCLUDES") || w.eq_ignore_ascii_case("EXCLUDES") => {
                self.list(depth, false)
            }
            _ => Err(unexpected(&t, "an operator (=, !=, <, <=, >, >=, LIKE, IN, NOT IN, INCLUDES, EXCLUDES)")),
        }
    }

    /// A field path, or a date function of one (`CALENDAR_YEAR(CreatedDate)`,
    /// `DAY_ONLY(convertTimezone(CreatedDate))`).
    fn field(&mut self, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("the condition nests deeper than {MAX_DEPTH} levels"));
        }
        let t = self.next("a field")?;
        let Kind::Word(name) = &t.kind else { return Err(unexpected(&t, "a field")) };
        if KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(name)) {
            return Err(unexpected(&t, "a field"));
        }
        if self.peek().is_some_and(|t| t.kind == Kind::Open) {
            salesforce_name(name).map_err(|e| format!("function `{name}` at character {}: {e}", t.at))?;
            self.pos += 1;
            self.field(depth + 1)?;
            return self.expect(Kind::Close, "`)` after the function's field");
        }
        salesforce_field_path(name).map_err(|e| format!("field `{name}` at character {}: {e}", t.at))
    }

    fn value(&self, t: &Token) -> Result<(), String> {
        match &t.kind {
            Kind::Str | Kind::Number | Kind::Date | Kind::DateTime => Ok(()),
            Kind::Word(w) => {
                let upper = w.to_ascii_uppercase();
                if ["NULL", "TRUE", "FALSE"].contains(&upper.as_str()) || DATE_LITERALS.contains(&upper.as_str()) {
                    return Ok(());
                }
                if let Some((name, n)) = upper.split_once(':') {
                    return if COUNTED_DATE_LITERALS.contains(&name) && !n.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("`{w}` at character {} is not a SOQL date literal", t.at))
                    };
                }
                if COUNTED_DATE_LITERALS.contains(&upper.as_str()) {
                    return Err(format!("`{w}` at character {} needs a count, e.g. `{w}:7`", t.at));
                }
                // Multi-currency literals: `USD5000`, `EUR12.5`.
                let (code, amount) = upper.split_at(upper.len().min(3));
                if code.len() == 3
                    && code.bytes().all(|b| b.is_ascii_uppercase())
                    && literal_kind(amount, t.at) == Ok(Kind::Number)
                    && !amount.starts_with(['-', '+'])
                {
                    return Ok(());
                }
                Err(format!(
                    "`{w}` at character {} is not a value; SOQL compares a field with a literal ('text', 42, 2024-01-31, TODAY, null, true), not with another field",
                    t.at
                ))
            }
            _ => Err(unexpected(t, "a value")),
        }
    }

    fn string(&mut self) -> Result<(), String> {
        let t = self.next("a quoted pattern")?;
        if t.kind == Kind::Str { Ok(()) } else { Err(unexpected(&t, "a quoted pattern such as 'Acme%'")) }
    }

    /// `( value, ... )`, or for IN a semi-join `(SELECT field FROM Object [WHERE ...])`.
    fn list(&mut self, depth: usize, semi_join: bool) -> Result<(), String> {
        self.expect(Kind::Open, "`(` to start the list")?;
        if semi_join && self.eat_keyword("SELECT") {
            if depth + 1 > MAX_DEPTH {
                return Err(format!("the condition nests deeper than {MAX_DEPTH} levels"));
            }
            self.field(depth + 1)?;
            if !self.eat_keyword("FROM") {
                let t = self.next("FROM")?;
                return Err(unexpected(&t, "FROM"));
            }
            let t = self.next("an object")?;
            match &t.kind {
                Kind::Word(o) if !KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(o)) => {
                    salesforce_name(o).map_err(|e| format!("object `{o}` at character {}: {e}", t.at))?
                }
                _ => return Err(unexpected(&t, "an object")),
            }
            if self.eat_keyword("WHERE") {
                self.condition(depth + 1)?;
            }
            return self.expect(Kind::Close, "`)` to end the sub-query");
        }
        loop {
            let t = self.next("a value")?;
            if t.kind == Kind::Close {
                return Err(format!("the list that ends at character {} is empty", t.at));
            }
            self.value(&t)?;
            let t = self.next("`,` or `)`")?;
            match t.kind {
                Kind::Comma => continue,
                Kind::Close => return Ok(()),
                _ => return Err(unexpected(&t, "`,` or `)`")),
            }
        }
    }
}

fn unexpected(t: &Token, expected: &str) -> String {
    format!("unexpected {} at character {}, where {expected} was expected", t.show(), t.at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_salesforce_accepts() {
        for ok in [
            "Name = 'Acme'",
            "Name = 'it\\'s (not) a paren'",
            "IsDeleted = false AND Type != null",
            "(Type = 'A' OR Type = 'B') AND AnnualRevenue > 1000.5",
            "NOT Name LIKE 'Test%'",
            "Name NOT LIKE 'Test\\_%'",
            "Industry IN ('Energy', 'Media')",
            "Industry NOT IN ('Energy')",
            "Topics__c INCLUDES ('a;b', 'c')",
            "Topics__c EXCLUDES ('a')",
            "CreatedDate > LAST_N_DAYS:7",
            "CreatedDate >= 2024-01-01T00:00:00Z AND CloseDate < 2024-12-31",
            "CreatedDate >= 2024-01-01T00:00:00.000+01:00",
            "CALENDAR_YEAR(CreatedDate) = 2024",
            "DAY_ONLY(convertTimezone(CreatedDate)) = TODAY",
            "Owner.Profile.Name <> 'System'",
            "Id IN (SELECT AccountId FROM Contact WHERE Email != null)",
            "AnnualRevenue > USD5000",
            "NumberOfEmployees > -1",
            "name = 'x' and type = 'y'",
        ] {
            assert_eq!(check_condition(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn conditions_that_escape_or_fail() {
        let escape = check_condition("x = 1) OR (Id != null").unwrap_err();
        assert!(escape.contains("did not open"), "{escape}");
        for bad in [
            "",
            "   ",
            "x = 1)",
            "(x = 1",
            "x = 1 OR (y = 2",
            "x = 1 LIMIT 5",
            "x = 1; DELETE",
            "x = 1 AND y = 2 OR z = 3",
            "Name = Other",
            "Name = 'open",
            "Name = 'bad \\q escape'",
            "Name LIKE 5",
            "Industry IN ()",
            "Industry IN ('a',)",
            "x =",
            "= 1",
            "x = 1 AND",
            "NOT",
            "x > null",
            "CreatedDate > LAST_N_DAYS",
            "CreatedDate > TODAY:3",
            "Date__c = 2024-02-30",
            "Date__c = 2024-01-01T00:00:00",
            "Bad__Name = 1",
            "Id IN (SELECT AccountId FROM Contact WHERE)",
            "x = :bind",
            "\"Name\" = 'x'",
        ] {
            assert!(check_condition(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn nesting_is_bounded_and_nothing_panics() {
        let deep = format!("{}x = 1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(check_condition(&deep).unwrap_err().contains("deeper"));
        let nots = format!("{}x = 1", "NOT ".repeat(10_000));
        assert!(check_condition(&nots).unwrap_err().contains("deeper"));
        let funcs = format!("{}x{} = 1", "f(".repeat(10_000), ")".repeat(10_000));
        assert!(check_condition(&funcs).is_err());
        let fine = format!("{}x = 1{}", "(".repeat(MAX_DEPTH - 1), ")".repeat(MAX_DEPTH - 1));
        assert_eq!(check_condition(&fine), Ok(()));
        for odd in ["'", "\\", "'\\u12", "é = 'é'", "x = 'é\\u00e9'", "-", "+1", "1e5", "x = 1.", "x = .5", "\0"] {
            let _ = check_condition(odd);
        }
    }
}
