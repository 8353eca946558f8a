//! Deterministic record generation for the objects the sandbox knows.
//!
//! Row `i` of an object is a pure function of (seed, i, start), so the same
//! `--generate Account=N` always yields the same data, and a larger N extends
//! a smaller one instead of reshuffling it. The data is built to exercise a
//! client: commas, quotes, raw newlines (LF and CRLF), non-ASCII and emoji,
//! nulls, literal `NA`/`null` strings, postal codes with leading zeros.

use chrono::{DateTime, Duration, Utc};

use super::data::{Field, FieldType, Schema, Value, make_id};

/// What the sandbox needs to know to host an object.
pub(crate) struct ObjectSpec {
    pub name: &'static str,
    pub schema: fn() -> Schema,
    /// Builds row `index` (0-based; its Id serial is `index + 1`), with
    /// timestamps strictly before `start`.
    pub generate: fn(seed: u64, index: u64, start: DateTime<Utc>) -> Vec<Option<Value>>,
    /// Changes some business fields of a row in place (not the timestamps).
    pub mutate: fn(row: &mut [Option<Value>], rng: &mut fastrand::Rng),
}

pub(crate) const OBJECTS: &[ObjectSpec] = &[
    ObjectSpec { name: "Account", schema: account_schema, generate: generate_account, mutate: mutate_account },
    ObjectSpec { name: "User", schema: user_schema, generate: generate_user, mutate: mutate_user },
];

/// Users every org has: generated Accounts are owned by these, so
/// `Owner.Email` resolves even when only Accounts are asked for.
pub(crate) const DEFAULT_USERS: usize = 8;

/// The object a lookup field points at, and its relationship name, as
/// describe reports them and SOQL resolves `Owner.Email`.
pub(crate) fn lookup_target(field: &str) -> Option<(&'static str, &'static str)> {
    match field {
        "OwnerId" => Some(("Owner", "User")),
        _ => None,
    }
}

pub(crate) fn find_object(name: &str) -> Option<&'static ObjectSpec> {
    OBJECTS.iter().find(|o| o.name.eq_ignore_ascii_case(name))
}

pub(crate) fn known_object_names() -> String {
    OBJECTS.iter().map(|o| o.name).collect::<Vec<_>>().join(", ")
}

/// SplitMix64 finaliser: spreads (seed, index) pairs so neighbouring rows get
/// unrelated random streams.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_add(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn row_rng(seed: u64, salt: u64, index: u64) -> fastrand::Rng {
    fastrand::Rng::with_seed(mix(mix(seed, salt), index))
}

const ACCOUNT_SALT: u64 = 0xACC0_0000_0000_0001;

fn field(name: &'static str, label: &'static str, ftype: FieldType, nillable: bool) -> Field {
    Field { name, label, ftype, nillable, picklist: &[] }
}

fn picklist(name: &'static str, label: &'static str, values: &'static [&'static str]) -> Field {
    Field { picklist: values, ..field(name, label, FieldType::Picklist, true) }
}

fn account_schema() -> Schema {
    use FieldType as T;
    Schema {
        name: "Account",
        key_prefix: "001",
        fields: vec![
            field("Id", "Account ID", T::Id, false),
            field("Name", "Account Name", T::String, false),
            picklist("Type", "Account Type", TYPES),
            picklist("Industry", "Industry", INDUSTRIES),
            field("AnnualRevenue", "Annual Revenue", T::Currency, true),
            field("NumberOfEmployees", "Employees", T::Int, true),
            picklist("Rating", "Account Rating", RATINGS),
            field("Phone", "Account Phone", T::Phone, true),
            field("Website", "Website", T::Url, true),
            field("BillingStreet", "Billing Street", T::TextArea, true),
            field("BillingCity", "Billing City", T::String, true),
            field("BillingPostalCode", "Billing Zip/Postal Code", T::String, true),
            field("BillingCountry", "Billing Country", T::String, true),
            field("Description", "Account Description", T::TextArea, true),
            field("IsActive__c", "Active", T::Boolean, false),
            field("CustomerSince__c", "Customer Since", T::Date, true),
            field("Score__c", "Score", T::Percent, true),
            field("CreatedDate", "Created Date", T::DateTime, false),
            field("LastModifiedDate", "Last Modified Date", T::DateTime, false),
            field("SystemModstamp", "System Modstamp", T::DateTime, false),
            field("IsDeleted", "Deleted", T::Boolean, false),
            field("OwnerId", "Owner ID", T::Reference, false),
        ],
    }
}

fn user_schema() -> Schema {
    use FieldType as T;
    Schema {
        name: "User",
        key_prefix: "005",
        fields: vec![
            field("Id", "User ID", T::Id, false),
            field("Username", "Username", T::String, false),
            field("Name", "Full Name", T::String, false),
            field("Email", "Email", T::Email, false),
            field("IsActive", "Active", T::Boolean, false),
            field("CreatedDate", "Created Date", T::DateTime, false),
            field("LastModifiedDate", "Last Modified Date", T::DateTime, false),
            field("SystemModstamp", "System Modstamp", T::DateTime, false),
        ],
    }
}

const USER_SALT: u64 = 0x5E40_0000_0000_0005;
const FIRST_NAMES: &[&str] = &["Ada", "Björn", "Chloé", "Dmitri", "Eun-ji", "Fatima", "Grace", "Hiro", "Ines", "José"];
const LAST_NAMES: &[&str] = &["O'Brien", "Nakamura", "Schröder", "Okafor", "García", "Lindqvist", "Dubois", "Kowalski"];

fn generate_user(seed: u64, index: u64, start: DateTime<Utc>) -> Vec<Option<Value>> {
    let mut rng = row_rng(seed, USER_SALT, index);
    let first = pick(&mut rng, FIRST_NAMES);
    let last = pick(&mut rng, LAST_NAMES);
    let local: String = format!("{first}.{last}{}", index + 1)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect::<String>()
        .to_lowercase();
    let created = start - Duration::days(400 + i64::from(rng.u16(..300)));
    let modified = start - Duration::days(31 + i64::from(rng.u16(..60)));
    vec![
        Some(Value::text(make_id("005", index + 1))),
        Some(Value::text(format!("{local}@nightjar.sandbox"))),
        Some(Value::text(format!("{first} {last}"))),
        Some(Value::text(format!("{local}@example.com"))),
        Some(Value::Bool(true)),
        Some(Value::DateTime(created)),
        Some(Value::DateTime(modified)),
        Some(Value::DateTime(modified)),
    ]
}

fn mutate_user(row: &mut [Option<Value>], rng: &mut fastrand::Rng) {
    const EMAIL: usize = 3;
    if let Some(slot) = row.get_mut(EMAIL) {
        *slot = Some(Value::text(format!("changed{}@example.com", rng.u32(..100_000))));
    }
}

const NAME_HEADS: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Hooli",
    "Vandelay",
    "Wonka",
    "Oceanic",
    "Nakatomi",
    "Aperture",
    "Blue Sun",
    "Monarch",
    "Sterling Cooper",
    "Müller",
    "Søren",
    "Łukasz",
    "Nordström",
];
const NAME_MIDDLES: &[&str] =
    &["", " Industries", " Holdings", " Logistics", " Systems", " Foods", " Energy", " Media", " Labs", " & Söhne"];
const NAME_TAILS: &[&str] = &[" Inc.", " GmbH", " Ltd", " S.A.", " Corp.", " AG", ", LLC", ""];
/// Awkward names that a client must escape correctly in SOQL and CSV.
const ODD_NAMES: &[&str] = &[
    "O'Brien & Sons",
    "Café \"Zur Post\"",
    "Smith, Jones & Partners",
    "株式会社 東京電機",
    "Back\\slash Trading",
    "Ünïcödé 🚀 Ventures",
];

const TYPES: &[&str] = &["Customer - Direct", "Customer - Channel", "Prospect", "Partner", "Reseller", "Other"];
const INDUSTRIES: &[&str] = &[
    "Agriculture",
    "Banking",
    "Biotechnology",
    "Chemicals",
    "Communications",
    "Construction",
    "Consulting",
    "Education",
    "Electronics",
    "Energy",
    "Engineering",
    "Entertainment",
    "Finance",
    "Healthcare",
    "Hospitality",
    "Insurance",
    "Manufacturing",
    "Media",
    "Retail",
    "Technology",
];
const RATINGS: &[&str] = &["Hot", "Warm", "Cold"];

/// (city, country, street names, phone prefix)
const PLACES: &[(&str, &str, &[&str], &str)] = &[
    ("München", "Germany", &["Marienplatz", "Leopoldstraße"], "+49 89"),
    ("São Paulo", "Brazil", &["Avenida Paulista", "Rua Augusta"], "+55 11"),
    ("Zürich", "Switzerland", &["Bahnhofstrasse", "Limmatquai"], "+41 44"),
    ("東京", "Japan", &["丸の内1丁目", "銀座4丁目"], "+81 3"),
    ("San Francisco", "United States", &["Market St", "Mission St"], "+1 415"),
    ("Boston", "United States", &["Beacon St", "Newbury St"], "+1 617"),
    ("Kraków", "Poland", &["Floriańska", "Grodzka"], "+48 12"),
    ("Reykjavík", "Iceland", &["Laugavegur", "Skólavörðustígur"], "+354"),
    ("Montréal", "Canada", &["Rue Sainte-Catherine", "Boulevard Saint-Laurent"], "+1 514"),
    ("København", "Denmark", &["Strøget", "Nyhavn"], "+45"),
    ("İstanbul", "Turkey", &["İstiklal Caddesi", "Bağdat Caddesi"], "+90 212"),
    ("Paris", "France", &["Rue de Rivoli", "Boulevard Haussmann"], "+33 1"),
];
const SECOND_LINES: &[&str] = &["Suite 400", "Floor 3", "2. OG", "Building B, Unit 7", "c/o Reception"];

const SENTENCES: &[&str] = &[
    "Long-standing customer, renewed in Q3.",
    "Prefers contact by \"email\" only.",
    "Key account 🚀 expanding into EMEA, APAC, and LATAM.",
    "Met at Dreamforce; follow up re: pricing, SLAs, and support.",
    "Uses the ☕ partner program.",
    "Offices: 東京支社, São Paulo, Zürich HQ.",
    "Contract says \"net 30\", invoices say \"net 45\".",
    "Escalation contact: Ms. O'Neil, ext. 42.",
    "Budget approved 👍",
    "Tabs\tinside\ttext.",
];

fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items.get(rng.usize(..items.len().max(1))).copied().unwrap_or("")
}

fn company_name(rng: &mut fastrand::Rng) -> String {
    if rng.u8(..20) == 0 {
        return pick(rng, ODD_NAMES).to_owned();
    }
    format!("{}{}{}", pick(rng, NAME_HEADS), pick(rng, NAME_MIDDLES), pick(rng, NAME_TAILS))
}

fn description(rng: &mut fastrand::Rng, index: u64) -> Option<String> {
    // Fixed positions guarantee every awkward case appears in small samples.
    match index % 20 {
        3 => return Some("NA".to_owned()),
        7 => return Some("null".to_owned()),
        11 => return None,
        13 => return Some("First line\r\nsecond line after CRLF\r\n".to_owned()),
        _ => {}
    }
    if rng.u8(..10) == 0 {
        return None;
    }
    let count = rng.usize(1..=4);
    let mut text = String::new();
    for i in 0..count {
        if i > 0 {
            text.push_str(if rng.bool() { " " } else { "\n" });
        }
        text.push_str(pick(rng, SENTENCES));
    }
    if index % 50 == 17 {
        // A long text area value, well past typical line-buffer sizes.
        let paragraph = text.clone();
        while text.len() < 6000 {
            text.push_str("\n\n");
            text.push_str(&paragraph);
        }
    }
    Some(text)
}

fn revenue(rng: &mut fastrand::Rng) -> Value {
    // In cents: $10,000 to $5 billion.
    Value::Decimal { units: rng.i64(1_000_000..500_000_000_000), scale: 2 }
}

fn generate_account(seed: u64, index: u64, start: DateTime<Utc>) -> Vec<Option<Value>> {
    let mut rng = row_rng(seed, ACCOUNT_SALT, index);
    let name = company_name(&mut rng);
    let (city, country, streets, phone_prefix) = PLACES[rng.usize(..PLACES.len())];

    let street = {
        let mut s = format!("{} {}", rng.u32(1..2000), pick(&mut rng, streets));
        if rng.u8(..10) < 7 {
            s.push('\n');
            s.push_str(pick(&mut rng, SECOND_LINES));
        }
        s
    };
    // Every seventh row has a postal code below 10000, so leading zeros are
    // certain to appear.
    let postal = if index.is_multiple_of(7) {
        format!("{:05}", rng.u32(501..10_000))
    } else {
        format!("{:05}", rng.u32(..100_000))
    };
    let slug: String = name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
    let website = if rng.u8(..10) == 0 || slug.is_empty() {
        None
    } else {
        Some(format!("https://www.{slug}-{}.example.com", index + 1))
    };

    let created = start - Duration::seconds(rng.i64(1..=30 * 86_400));
    let until_start = (start - created).num_seconds().max(1);
    let last_modified = created + Duration::seconds(rng.i64(0..until_start));
    let until_start = (start - last_modified).num_seconds().max(1);
    let modstamp = last_modified + Duration::seconds(rng.i64(0..until_start.min(120)));

    let customer_since = start.date_naive() - Duration::days(rng.i64(30..9_000));

    vec![
        Some(Value::text(make_id("001", index + 1))),
        Some(Value::text(name)),
        Some(Value::text(pick(&mut rng, TYPES))),
        (rng.u8(..5) != 0).then(|| Value::text(pick(&mut rng, INDUSTRIES))),
        (rng.u8(..7) != 0).then(|| revenue(&mut rng)),
        (rng.u8(..20) != 0).then(|| Value::Int(i64::from(rng.u32(1..250_000)))),
        (rng.u8(..4) != 0).then(|| Value::text(pick(&mut rng, RATINGS))),
        Some(Value::text(format!("{phone_prefix} {:03} {:04}", rng.u32(100..1000), rng.u32(..10_000)))),
        website.map(Value::text),
        Some(Value::text(street)),
        Some(Value::text(city)),
        Some(Value::text(postal)),
        Some(Value::text(country)),
        description(&mut rng, index).map(Value::text),
        Some(Value::Bool(rng.bool())),
        (rng.u8(..10) != 0).then_some(Value::Date(customer_since)),
        (rng.u8(..10) != 0).then(|| Value::Double(f64::from(rng.u32(..=10_000)) / 100.0)),
        Some(Value::DateTime(created)),
        Some(Value::DateTime(last_modified)),
        Some(Value::DateTime(modstamp)),
        Some(Value::Bool(false)),
        Some(Value::text(make_id("005", 1 + rng.u64(..8)))),
    ]
}

fn mutate_account(row: &mut [Option<Value>], rng: &mut fastrand::Rng) {
    // Indices follow account_schema(); checked by the mutation test.
    const NAME: usize = 1;
    const ANNUAL_REVENUE: usize = 4;
    const DESCRIPTION: usize = 13;
    if let Some(slot) = row.get_mut(NAME) {
        let mut name = company_name(rng);
        if slot.as_ref().map(Value::render).as_deref() == Some(name.as_str()) {
            name.push_str(" (renamed)");
        }
        *slot = Some(Value::text(name));
    }
    if let Some(slot) = row.get_mut(ANNUAL_REVENUE) {
        *slot = Some(revenue(rng));
    }
    if let Some(slot) = row.get_mut(DESCRIPTION) {
        let variant = rng.u64(..1_000_000);
        let mut text = description(rng, variant).unwrap_or_default();
        text.push_str(if text.is_empty() { "Updated." } else { " Updated." });
        *slot = Some(Value::text(text));
    }
}

/// The random stream for an update of row `index` in mutation round `epoch`.
pub(crate) fn mutation_rng(seed: u64, epoch: u64, index: u64) -> fastrand::Rng {
    row_rng(mix(seed, epoch), ACCOUNT_SALT ^ 0x5EED, index)
}

/// Picks which live rows an update round changes, reproducibly.
pub(crate) fn choose_rows(seed: u64, epoch: u64, mut live: Vec<usize>, n: usize) -> Vec<usize> {
    if n < live.len() {
        let mut rng = fastrand::Rng::with_seed(mix(mix(seed, 0xC400_5E00), epoch));
        // Partial Fisher–Yates: only the first n positions are needed.
        for i in 0..n {
            let j = rng.usize(i..live.len());
            live.swap(i, j);
        }
        live.truncate(n);
        live.sort_unstable();
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    fn rows(seed: u64, n: u64) -> Vec<Vec<Option<Value>>> {
        (0..n).map(|i| generate_account(seed, i, start())).collect()
    }

    #[test]
    fn same_seed_same_data_and_prefixes_are_stable() {
        assert_eq!(rows(42, 200), rows(42, 200));
        assert_eq!(rows(42, 500)[..200], rows(42, 200)[..]);
        assert_ne!(rows(42, 50), rows(43, 50));
    }

    #[test]
    fn rows_match_the_schema_and_stay_before_start() {
        let schema = account_schema();
        let created = schema.index_of("CreatedDate").unwrap();
        let modified = schema.index_of("LastModifiedDate").unwrap();
        let modstamp = schema.index_of("SystemModstamp").unwrap();
        let window_start = start() - Duration::days(30);
        let mut ids = std::collections::HashSet::new();
        for row in rows(42, 1000) {
            assert_eq!(row.len(), schema.fields.len());
            let Some(Value::Text(id)) = &row[0] else { panic!("Id missing") };
            assert_eq!(id.len(), 18);
            assert!(ids.insert(id.clone()), "duplicate id {id}");
            let t = |i: usize| match &row[i] {
                Some(Value::DateTime(t)) => *t,
                other => panic!("not a datetime: {other:?}"),
            };
            assert!(window_start <= t(created));
            assert!(t(created) <= t(modified) && t(modified) <= t(modstamp));
            assert!(t(modstamp) < start());
            for (f, v) in schema.fields.iter().zip(&row) {
                assert!(f.nillable || v.is_some(), "{} is null", f.name);
            }
        }
    }

    #[test]
    fn data_contains_the_awkward_cases() {
        let all: Vec<String> = rows(42, 100).into_iter().flatten().flatten().map(|v| v.render()).collect();
        let any = |p: &dyn Fn(&str) -> bool| all.iter().any(|s| p(s));
        assert!(any(&|s| s.contains(',')));
        assert!(any(&|s| s.contains('"')));
        assert!(any(&|s| s.contains('\n')));
        assert!(any(&|s| s.contains("\r\n")));
        assert!(any(&|s| !s.is_ascii()));
        assert!(any(&|s| s.chars().any(|c| c as u32 > 0xFFFF)), "no emoji");
        assert!(any(&|s| s == "NA"));
        assert!(any(&|s| s == "null"));
        assert!(any(&|s| s.len() == 5 && s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit())));
        let descriptions = rows(42, 100).into_iter().filter(|r| r[13].is_none()).count();
        assert!(descriptions > 0, "no null descriptions");
    }

    #[test]
    fn mutation_changes_business_fields() {
        let schema = account_schema();
        assert_eq!(schema.index_of("Name"), Some(1));
        assert_eq!(schema.index_of("AnnualRevenue"), Some(4));
        assert_eq!(schema.index_of("Description"), Some(13));
        let mut row = generate_account(42, 5, start());
        let before = row.clone();
        mutate_account(&mut row, &mut mutation_rng(42, 0, 5));
        assert_ne!(row[1], before[1]);
        assert_ne!(row[13], before[13]);
        assert_eq!(row[0], before[0]);
    }

    #[test]
    fn choosing_rows_is_reproducible() {
        let live: Vec<usize> = (0..100).collect();
        let a = choose_rows(42, 3, live.clone(), 10);
        assert_eq!(a, choose_rows(42, 3, live.clone(), 10));
        assert_eq!(a.len(), 10);
        assert_ne!(a, choose_rows(42, 4, live.clone(), 10));
        assert_eq!(choose_rows(42, 3, live.clone(), 500), live);
    }
}
