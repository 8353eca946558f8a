#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into DIR/<target>/ (default
fuzz/seeds), from the inputs the tests and the example project use. The
committed corpus is these seeds after fuzzing, minimised with -merge=1; see
README.md. Run from the repository root."""

import gzip
import os
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "fuzz/seeds"


def write(target, name, data):
    os.makedirs(f"{out}/{target}", exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(f"{out}/{target}/{name}", "wb") as f:
        f.write(data)


# ---- page: mode byte, count byte, body (see nightjar::fuzzing::page)
pages = [
    # src/salesforce/page.rs unit tests
    ('"Id","Name","Note"\n"001","Acme, ""Inc""","line1\nline2 \u00fc"\n"002","","NA"\n', 2),
    ('"Id","Name"\n', 0),
    ("", 0),
    ('"Id","Name"\n"1"\n', 1),
    ('"Id","Name"\n"001","Acme"\n"002","Glob', 2),
    ('"Id","Note"\n"001","one\ntwo\n', 1),
    ('"Id","Name","Note"\n"001","Acme, ""Inc""","a\nb"\n"002","","x"\n"003","Zed",""\n', 3),
    ('"Id"\n"1"\n"2"\n', 2),
    ('"Id","Id"\n"1","2"\n', 1),
    # Sandbox-shaped Account pages, LF and CRLF line endings
    ('"Id","Name","AnnualRevenue","CreatedDate","IsDeleted"\n'
     '"001000000000001AAA","Acme","1498212971.32","2024-01-31T12:00:00.000+0000","false"\n'
     '"001000000000002AAA","O\'Brien ""100%""","","2024-02-01T00:00:00.000Z","true"\n', 2),
    ('"Id","Name"\r\n"001","a\r\nb"\r\n"002",""\r\n', 2),
    ('Id,Name\n001,plain\n002,\n', 2),
    ('"Id","Description"\n"001","tab\there, comma, ""quote"", \u00e9\u00e8 \U0001F600"\n', 1),
]
for i, (body, count) in enumerate(pages):
    write("page", f"plain-{i}", bytes([0, count]) + body.encode())
    write("page", f"gzip-{i}", bytes([1, count]) + gzip.compress(body.encode()))
write("page", "no-count", bytes([2, 0]) + b'"Id"\n"1"\n')
for i, header in enumerate(["3", " 3 ", "+3", "three", "-1", "18446744073709551616", ""]):
    write("page", f"count-text-{i}", bytes([4, 0]) + header.encode() + b'\n"Id"\n"1"\n"2"\n"3"\n')

# ---- cast: precision byte, scale byte, text (p = 1 + b0 % 38, s = b1 % (p + 1))
values = [
    "300", "-7", "12.00", "12.5", "1e3", "99999999999999999999", "abc", " 42 ", "+0", "-0.0",
    "1.5", "2.5E7", "NaN", "inf", "1,5", "-1.25e-2", "1.0E-7", "1.23456789012345678E17", "1E400000",
    "true", "FALSE", "yes", "1",
    "1970-01-02", "1969-12-31", "2024-02-29", "2024-02-30", "2024-01-31T00:00:00Z", "0000-01-01", "9999-12-31",
    "12:00:00.000Z", "00:00:01", "23:59:59.250Z", "25:00:00", "23:59:60", "23:59:59.999999999",
    "2024-01-31T12:00:00.123Z", "2024-01-31T12:00:00.123+0000", "2024-01-31T12:00:00.123+00:00",
    "2024-01-31T13:00:00.123+01:00", "2024-01-31T12:00:00Z", "2024-01-31T12:00:00",
    "0000-01-01T00:00:00.000+01:00", "9999-12-31T23:59:59.999-01:00",
    "1498212971.32", "7", "-0.50", "-0.00", "12.500", "12.345", "1000", ".",
    '{"a": [1, 2]}', "{a: 1}", '"a\\u0000b"', '{"k": "\\ud83d\\ude00"}', "[]", "null", "1e999",
]
for i, v in enumerate(values):
    write("cast", f"value-{i}", bytes([17, 2]) + v.encode())
write("cast", "decimal-5-2", bytes([4, 2]) + b"999.99")
write("cast", "decimal-38-0", bytes([37, 0]) + b"9" * 38)

# ---- config: `=== PATH` sections (see nightjar::fuzzing::config)
def text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

project = text("nightjar.toml")
job = text("jobs/accounts.toml")
mapping = text("mappings/accounts.toml")
write("config", "example", f"=== nightjar.toml\n{project}=== jobs/accounts.toml\n{job}=== mappings/accounts.toml\n{mapping}")
write("config", "no-mapping", f"=== nightjar.toml\n{project}=== jobs/accounts.toml\n{job}")
write("config", "empty", "=== nightjar.toml\n")
# The validate golden cases are the example project with one line changed
# (tests/integration/validate.rs lists each change as a pair of lines).
cases = re.findall(r'\(\s*"([a-z-]+)",\s*"([a-z/.]+)",\s*"((?:[^"\\]|\\.)*)",\s*"((?:[^"\\]|\\.)*)"', text("tests/integration/validate.rs"))
for name, file, old, new in cases:
    old, new = (bytes(s, "utf-8").decode("unicode_escape") for s in (old, new))
    files = {"nightjar.toml": project, "jobs/accounts.toml": job, "mappings/accounts.toml": mapping}
    if file in files and old in files[file]:
        files[file] = files[file].replace(old, new, 1)
        write("config", f"validate-{name}", "".join(f"=== {p}\n{t}" for p, t in files.items()))

# ---- sql: the expression text
exprs = [
    '"BillingCity" || \', \' || "BillingCountry"', 'upper("BillingCity"', "Name NOT LIKE 'Test %'", "Name NOT LIKE",
    "upper(Name)", "Industry IS NULL OR Industry <> 'Banking'", "Industry IS NULL OR Industry <> 'Internal'",
    'upper("BillingCity") || \' / \' || "BillingCountry"', 'CAST("NumberOfEmployees" AS INTEGER) >= 1000',
    'lower("Owner.Email") || \'-\' || Name', "lower(Name", "'x'", "max(Name)", "count(Name)",
    "sum(CAST(N AS INTEGER)) OVER ()", "Name || max(Name)", "CAST(N AS INTEGER) * 2", "lower(Email)",
    "CASE WHEN CAST(Employees AS INTEGER) >= 100 THEN 'large' ELSE 'small' END", "Segment <> 'Test'",
    "CAST(Amount AS DOUBLE) / 0", "substr(Name, 1, 3)", "Amount IN ('1', '2')", "coalesce(Name, Id)",
    "CAST(CreatedDate AS TIMESTAMP)", "length(Name) > 3", "Name LIKE '%x%' AND NOT IsDeleted = 'true'",
]
for i, e in enumerate(exprs):
    write("sql", f"expr-{i}", e)

# ---- soql_where: the condition text
conditions = [
    "Name = 'ACME'", "Name LIKE 'acme%'", "Name LIKE '%\\\\%'", "Name = 'O\\'Brien 100%'", "Name = null",
    "AnnualRevenue != null", "AnnualRevenue > 99.5", "Name != 'acme'",
    "Name IN ('globex', 'Acme') OR (IsDeleted = false AND NOT AnnualRevenue < 200)",
    "Id NOT IN ('001000000000001', '001000000000002AAA')", "CustomerSince__c = 2024-01-01",
    "SystemModstamp >= 2024-01-01T01:00:00Z", "IsDeleted = false) OR (Id != null",
    "Name = 'a' OR Name = 'b'", "(Name = 'x'", "Name = 'unclosed", "Industry INCLUDES ('a;b')",
]
for i, c in enumerate(conditions):
    write("soql_where", f"condition-{i}", c)
