//! `describe` and global describe bodies (salesforce-bulk-api.md §6), built
//! from the sandbox's schemas: the keys an extractor reads to plan a SELECT
//! and map types, not the full metadata Salesforce returns.

use serde::Serialize;

use super::data::{Field, FieldType, Schema};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GlobalDescribe {
    encoding: &'static str,
    max_batch_size: u32,
    sobjects: Vec<ObjectSummary>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectSummary {
    name: &'static str,
    label: &'static str,
    key_prefix: &'static str,
    custom: bool,
    queryable: bool,
    createable: bool,
    updateable: bool,
    deletable: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ObjectDescribe {
    #[serde(flatten)]
    summary: ObjectSummary,
    fields: Vec<FieldDescribe>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldDescribe {
    name: &'static str,
    label: &'static str,
    #[serde(rename = "type")]
    field_type: &'static str,
    soap_type: &'static str,
    length: u32,
    byte_length: u32,
    precision: u32,
    scale: u32,
    digits: u32,
    nillable: bool,
    custom: bool,
    calculated: bool,
    calculated_formula: Option<String>,
    external_id: bool,
    id_lookup: bool,
    unique: bool,
    createable: bool,
    updateable: bool,
    filterable: bool,
    sortable: bool,
    reference_to: Vec<&'static str>,
    relationship_name: Option<&'static str>,
    compound_field_name: Option<&'static str>,
    picklist_values: Vec<PicklistValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PicklistValue {
    value: &'static str,
    label: &'static str,
    active: bool,
    default_value: bool,
}

fn summary(schema: &Schema) -> ObjectSummary {
    ObjectSummary {
        name: schema.name,
        label: schema.name,
        key_prefix: schema.key_prefix,
        custom: schema.name.ends_with("__c"),
        queryable: true,
        createable: true,
        updateable: true,
        deletable: true,
    }
}

pub(crate) fn global<'a>(schemas: impl IntoIterator<Item = &'a Schema>) -> GlobalDescribe {
    GlobalDescribe { encoding: "UTF-8", max_batch_size: 200, sobjects: schemas.into_iter().map(summary).collect() }
}

pub(crate) fn object(schema: &Schema) -> ObjectDescribe {
    ObjectDescribe { summary: summary(schema), fields: schema.fields.iter().map(field).collect() }
}

fn field(f: &Field) -> FieldDescribe {
    let system = matches!(f.name, "Id" | "CreatedDate" | "LastModifiedDate" | "SystemModstamp" | "IsDeleted");
    let (precision, scale) = f.ftype.precision_scale();
    // Lookups follow Salesforce's naming: `OwnerId` → relationship `Owner`.
    let (reference_to, relationship_name) = match (f.ftype, super::generate::lookup_target(f.name)) {
        (FieldType::Reference, Some((relationship, target))) => (vec![target], Some(relationship)),
        (FieldType::Reference, None) => (Vec::new(), f.name.strip_suffix("Id")),
        _ => (Vec::new(), None),
    };
    let compound_field_name =
        ["Billing", "Shipping", "Mailing"].into_iter().find(|p| f.name.starts_with(p)).map(|p| match p {
            "Billing" => "BillingAddress",
            "Shipping" => "ShippingAddress",
            _ => "MailingAddress",
        });
    FieldDescribe {
        name: f.name,
        label: f.label,
        field_type: f.ftype.api_name(),
        soap_type: f.ftype.soap_type(),
        length: f.ftype.length(),
        byte_length: f.ftype.length() * 3,
        precision,
        scale,
        digits: if f.ftype == FieldType::Int { 9 } else { 0 },
        nillable: f.nillable,
        custom: f.name.ends_with("__c"),
        calculated: false,
        calculated_formula: None,
        external_id: false,
        id_lookup: f.ftype == FieldType::Id,
        unique: false,
        createable: !system,
        updateable: !system,
        filterable: true,
        sortable: f.ftype != FieldType::TextArea,
        reference_to,
        relationship_name,
        compound_field_name,
        picklist_values: f
            .picklist
            .iter()
            .map(|&value| PicklistValue { value, label: value, active: true, default_value: false })
            .collect(),
    }
}
