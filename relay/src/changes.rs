//! Change events from plain tables: every inserted, updated or deleted row of
//! a captured table becomes a JSON envelope (ditto's and Debezium's shape),
//! keyed by its primary key. Pure: table map and rows in, records out.
//!
//! Envelope: `{"id", "schema", "table", "action", "data", "dataOld",
//! "eventTime"}`; `data` is the row after (null for a delete), `dataOld` the
//! row before (null for an insert). Column values render losslessly (README
//! "Change events from plain tables" has the table).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use k8s_openapi::jiff::Timestamp;
use mysql_async::binlog::events::{OptionalMetadataField, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::{Column, Value};
use serde_json::{Map, Number, Value as Json};

use crate::config::{Action, ChangesConfig};
use crate::outbox::{header, BadRow, Headers, Record, RowContext};
use crate::rows::RowLayout;

/// The `binary` character set: bytes, sent as base64.
const BINARY: u16 = 63;
/// The latin1 character sets (ISO-8859-1 bytes).
const LATIN1: [u16; 8] = [5, 8, 15, 31, 47, 48, 49, 94];

/// A captured table as the binlog describes it.
#[derive(Debug, Clone)]
pub struct ChangeTable {
    /// `database.table`
    pub name: Arc<str>,
    database: String,
    table: String,
    actions: Vec<Action>,
    topic: String,
    /// Member names of ENUM and SET columns, by column index.
    members: HashMap<usize, Vec<String>>,
    /// Every column, with its name, character set and primary-key flag.
    pub layout: RowLayout,
    max_message_bytes: usize,
}

/// Where a row sits, for its id and headers.
#[derive(Debug, Clone, Copy)]
pub struct ChangeContext<'a> {
    /// Unique and stable across replays: `<gtid>/<n>` or `<file>:<pos>/<n>`.
    pub id: &'a str,
    /// Where the row sits: its position headers.
    pub at: RowContext<'a>,
    /// The binlog event's timestamp (seconds).
    pub time: u32,
}

impl ChangeTable {
    /// The captured table of `tme` (its column `names` from the table map),
    /// or None when `cfg` does not capture it.
    pub fn new(
        tme: &TableMapEvent<'_>,
        names: &[String],
        cfg: &ChangesConfig,
        max_message_bytes: usize,
    ) -> Result<Option<ChangeTable>, String> {
        let database = tme.database_name().into_owned();
        let table = tme.table_name().into_owned();
        let Some((actions, topic)) = cfg.table(&database, &table) else {
            return Ok(None);
        };
        let mut enums = Vec::new();
        let mut sets = Vec::new();
        for field in tme.iter_optional_meta().flatten() {
            match field {
                OptionalMetadataField::EnumStrValue(v) => {
                    enums = v
                        .iter_values()
                        .flatten()
                        .map(|e| e.values().iter().map(|s| s.value().into_owned()).collect())
                        .collect::<Vec<Vec<String>>>();
                }
                OptionalMetadataField::SetStrValue(v) => {
                    sets = v
                        .iter_values()
                        .flatten()
                        .map(|e| e.values().iter().map(|s| s.value().into_owned()).collect())
                        .collect::<Vec<Vec<String>>>();
                }
                _ => {}
            }
        }
        let (mut enums, mut sets) = (enums.into_iter(), sets.into_iter());
        let mut members = HashMap::new();
        for i in 0..tme.columns_count() as usize {
            let names = match tme.get_column_type(i) {
                Ok(Some(ColumnType::MYSQL_TYPE_ENUM)) => enums.next(),
                Ok(Some(ColumnType::MYSQL_TYPE_SET)) => sets.next(),
                _ => None,
            };
            if let Some(n) = names {
                members.insert(i, n);
            }
        }
        Ok(Some(ChangeTable {
            name: Arc::from(format!("{database}.{table}")),
            database,
            table,
            actions: actions.to_vec(),
            topic,
            members,
            layout: RowLayout::new(tme, names, |_| true)?,
            max_message_bytes,
        }))
    }

    pub fn wants(&self, action: Action) -> bool {
        self.actions.contains(&action)
    }

    /// The change event of one row: `before` and `after` as the rows event
    /// gives them (an insert has no before, a delete no after).
    pub fn map(
        &self,
        action: Action,
        before: Option<BinlogRow>,
        after: Option<BinlogRow>,
        ctx: ChangeContext<'_>,
    ) -> Result<Record, BadRow> {
        let bad = |reason: String| BadRow {
            reason,
            id: Some(ctx.id.to_owned()),
            key: None,
            value: None,
        };
        let data = after
            .as_ref()
            .map(|r| self.row_json(r))
            .transpose()
            .map_err(bad)?;
        let data_old = before
            .as_ref()
            .map(|r| self.row_json(r))
            .transpose()
            .map_err(bad)?;
        let image = data.as_ref().or(data_old.as_ref());
        let key = key_of(after.as_ref().or(before.as_ref()), image)
            .unwrap_or_else(|| self.name.as_bytes().to_vec());
        let mut envelope = Map::new();
        envelope.insert("id".into(), ctx.id.into());
        envelope.insert("schema".into(), self.database.clone().into());
        envelope.insert("table".into(), self.table.clone().into());
        envelope.insert("action".into(), action.as_str().into());
        envelope.insert("data".into(), data.map_or(Json::Null, Json::Object));
        envelope.insert("dataOld".into(), data_old.map_or(Json::Null, Json::Object));
        envelope.insert(
            "eventTime".into(),
            Timestamp::from_second(ctx.time as i64)
                .map(|t| t.to_string())
                .unwrap_or_default()
                .into(),
        );
        let value = serde_json::to_vec(&Json::Object(envelope)).map_err(|e| BadRow {
            reason: format!("cannot encode the change event: {e}"),
            id: Some(ctx.id.to_owned()),
            key: Some(key.clone()),
            value: None,
        })?;
        let mut headers: Headers = Vec::with_capacity(5);
        headers.push((header::ID.into(), ctx.id.as_bytes().to_vec()));
        headers.push((
            header::EVENT_TYPE.into(),
            action.as_str().as_bytes().to_vec(),
        ));
        ctx.at.push_headers(&mut headers);
        Record {
            topic: self.topic.clone(),
            key,
            value: Some(value),
            headers,
            id: ctx.id.to_owned(),
        }
        .within(self.max_message_bytes)
    }

    /// A row image as a JSON object of column name → value.
    fn row_json(&self, row: &BinlogRow) -> Result<Map<String, Json>, String> {
        let mut m = Map::new();
        for (i, c) in row.columns_ref().iter().enumerate() {
            let Some(v) = row.as_ref(i) else { continue };
            let j = column_json(c, v, self.members.get(&i).map(Vec::as_slice))
                .map_err(|e| format!("column `{}` of {}: {e}", c.name_str(), self.name))?;
            m.insert(c.name_str().into_owned(), j);
        }
        Ok(m)
    }
}

/// The record key: the primary key's value (its JSON text unless a string),
/// a JSON array of them for a composite key; None without a primary key.
fn key_of(row: Option<&BinlogRow>, image: Option<&Map<String, Json>>) -> Option<Vec<u8>> {
    let (row, image) = (row?, image?);
    let pk: Vec<&Json> = row
        .columns_ref()
        .iter()
        .filter(|c| c.flags().contains(ColumnFlags::PRI_KEY_FLAG))
        .filter_map(|c| image.get(c.name_str().as_ref()))
        .collect();
    match pk.as_slice() {
        [] => None,
        [Json::String(s)] => Some(s.as_bytes().to_vec()),
        [one] => Some(one.to_string().into_bytes()),
        many => Some(
            Json::Array(many.iter().map(|v| (*v).clone()).collect())
                .to_string()
                .into_bytes(),
        ),
    }
}

/// One column value, lossless: integers and floats as numbers, DECIMAL as
/// a string, text as a string, binary as base64, dates and times as ISO
/// 8601 text, TIMESTAMP in UTC, BIT as a number, ENUM and SET by name, MySQL
/// JSON as the JSON value.
fn column_json(
    c: &Column,
    v: &BinlogValue<'_>,
    members: Option<&[String]>,
) -> Result<Json, String> {
    use ColumnType::*;
    let v = match v {
        BinlogValue::Value(v) => v,
        BinlogValue::Jsonb(j) => {
            return serde_json::Value::try_from(j.clone()).map_err(|e| e.to_string())
        }
        BinlogValue::JsonDiff(_) => {
            return Err(
                "a partial JSON update (binlog_row_value_options=PARTIAL_JSON) has no \
                        full value: set binlog_row_value_options to ''"
                    .into(),
            )
        }
    };
    if let Value::NULL = v {
        return Ok(Json::Null);
    }
    let bytes = |v: &Value| match v {
        Value::Bytes(b) => Ok(b.clone()),
        other => Err(format!("unexpected value {other:?}")),
    };
    Ok(match c.column_type() {
        MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG
        | MYSQL_TYPE_LONGLONG => match v {
            Value::Int(i) => Json::from(*i),
            Value::UInt(u) => Json::from(*u),
            other => return Err(format!("unexpected integer value {other:?}")),
        },
        MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => {
            let f = match v {
                // The shortest text that reads back as the same f32.
                Value::Float(f) => f.to_string().parse::<f64>().unwrap_or(*f as f64),
                Value::Double(d) => *d,
                other => return Err(format!("unexpected float value {other:?}")),
            };
            Number::from_f64(f).map(Json::Number).unwrap_or(Json::Null)
        }
        MYSQL_TYPE_YEAR => {
            let b = bytes(v)?;
            Json::from(
                String::from_utf8_lossy(&b)
                    .parse::<u32>()
                    .map_err(|e| e.to_string())?,
            )
        }
        MYSQL_TYPE_BIT => Json::from(bytes(v)?.iter().fold(0u64, |n, b| (n << 8) | *b as u64)),
        MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => {
            Json::String(String::from_utf8_lossy(&bytes(v)?).into_owned())
        }
        MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => {
            let text = String::from_utf8_lossy(&bytes(v)?).into_owned();
            let (secs, micros) = text.split_once('.').unwrap_or((&text, "0"));
            let secs: i64 = secs.parse().map_err(|_| format!("bad TIMESTAMP {text}"))?;
            let micros: i32 = format!("{micros:0<6}")[..6]
                .parse()
                .map_err(|_| format!("bad TIMESTAMP {text}"))?;
            Json::String(
                Timestamp::new(secs, micros * 1000)
                    .map_err(|e| e.to_string())?
                    .to_string(),
            )
        }
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => match v {
            Value::Date(y, m, d, ..) => Json::String(format!("{y:04}-{m:02}-{d:02}")),
            other => return Err(format!("unexpected date {other:?}")),
        },
        MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => match v {
            Value::Date(y, mo, d, h, mi, s, us) => Json::String(format!(
                "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{}",
                fraction(*us)
            )),
            other => return Err(format!("unexpected datetime {other:?}")),
        },
        MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => match v {
            Value::Time(neg, days, h, m, s, us) => Json::String(format!(
                "{}{:02}:{m:02}:{s:02}{}",
                if *neg { "-" } else { "" },
                *days as u64 * 24 + *h as u64,
                fraction(*us)
            )),
            other => return Err(format!("unexpected time {other:?}")),
        },
        MYSQL_TYPE_ENUM => {
            let i = match v {
                Value::Int(i) => *i,
                other => return Err(format!("unexpected ENUM value {other:?}")),
            };
            // 0 is the empty string MySQL stores for an invalid value.
            match (i, members) {
                (0, _) => Json::String(String::new()),
                (i, Some(names)) if (i as usize) <= names.len() => {
                    Json::String(names[i as usize - 1].clone())
                }
                (i, _) => Json::from(i),
            }
        }
        MYSQL_TYPE_SET => {
            let b = bytes(v)?;
            let mask = b.iter().rev().fold(0u64, |n, b| (n << 8) | *b as u64);
            match members {
                Some(names) => Json::String(
                    names
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, n)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                None => Json::from(mask),
            }
        }
        MYSQL_TYPE_STRING
        | MYSQL_TYPE_VAR_STRING
        | MYSQL_TYPE_VARCHAR
        | MYSQL_TYPE_BLOB
        | MYSQL_TYPE_TINY_BLOB
        | MYSQL_TYPE_MEDIUM_BLOB
        | MYSQL_TYPE_LONG_BLOB => text(bytes(v)?, c.character_set()),
        // GEOMETRY (SRID + WKB), VECTOR and anything newer: bytes.
        _ => Json::String(base64::engine::general_purpose::STANDARD.encode(bytes(v)?)),
    })
}

/// Text in its character set as a JSON string; `binary` (and text that is
/// not valid in its character set) as base64.
fn text(b: Vec<u8>, charset: u16) -> Json {
    if charset == BINARY {
        return Json::String(base64::engine::general_purpose::STANDARD.encode(b));
    }
    if LATIN1.contains(&charset) {
        return Json::String(b.iter().map(|c| *c as char).collect());
    }
    match String::from_utf8(b) {
        Ok(s) => Json::String(s),
        Err(e) => Json::String(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
    }
}

/// `.ffffff` for a non-zero microsecond part.
fn fraction(us: u32) -> String {
    if us == 0 {
        String::new()
    } else {
        format!(".{us:06}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(ty: ColumnType, charset: u16) -> Column {
        Column::new(ty).with_character_set(charset).with_name(b"c")
    }

    fn j(ty: ColumnType, v: Value) -> Json {
        column_json(&col(ty, 45), &BinlogValue::Value(v), None).expect("renders")
    }

    #[test]
    fn every_type_renders_losslessly() {
        use ColumnType::*;
        assert_eq!(
            j(MYSQL_TYPE_LONGLONG, Value::UInt(u64::MAX)),
            serde_json::json!(u64::MAX)
        );
        assert_eq!(
            j(MYSQL_TYPE_TINY, Value::Int(-128)),
            serde_json::json!(-128)
        );
        assert_eq!(
            j(MYSQL_TYPE_FLOAT, Value::Float(1.1)),
            serde_json::json!(1.1)
        );
        assert_eq!(
            j(MYSQL_TYPE_DOUBLE, Value::Double(-2.5e-300)),
            serde_json::json!(-2.5e-300)
        );
        assert_eq!(
            j(
                MYSQL_TYPE_NEWDECIMAL,
                Value::Bytes(b"-12345678901234567890.0001".to_vec())
            ),
            serde_json::json!("-12345678901234567890.0001")
        );
        assert_eq!(
            j(MYSQL_TYPE_YEAR, Value::Bytes(b"2026".to_vec())),
            serde_json::json!(2026)
        );
        assert_eq!(
            j(MYSQL_TYPE_BIT, Value::Bytes(vec![1, 0])),
            serde_json::json!(256)
        );
        assert_eq!(
            j(
                MYSQL_TYPE_TIMESTAMP2,
                Value::Bytes(b"1764642000.5".to_vec())
            ),
            serde_json::json!("2025-12-02T02:20:00.5Z")
        );
        assert_eq!(
            j(MYSQL_TYPE_DATETIME2, Value::Date(2026, 12, 2, 3, 4, 5, 60)),
            serde_json::json!("2026-12-02T03:04:05.000060")
        );
        assert_eq!(
            j(MYSQL_TYPE_DATE, Value::Date(1000, 1, 1, 0, 0, 0, 0)),
            serde_json::json!("1000-01-01")
        );
        assert_eq!(
            j(MYSQL_TYPE_TIME2, Value::Time(true, 1, 2, 3, 4, 0)),
            serde_json::json!("-26:03:04")
        );
        assert_eq!(
            j(MYSQL_TYPE_VARCHAR, Value::Bytes("żółw".as_bytes().to_vec())),
            serde_json::json!("żółw")
        );
        let binary = column_json(
            &col(MYSQL_TYPE_BLOB, BINARY),
            &BinlogValue::Value(Value::Bytes(vec![0, 255])),
            None,
        );
        assert_eq!(binary, Ok(serde_json::json!("AP8=")));
        let latin1 = column_json(
            &col(MYSQL_TYPE_STRING, 8),
            &BinlogValue::Value(Value::Bytes(vec![0xe9])),
            None,
        );
        assert_eq!(latin1, Ok(serde_json::json!("é")));
        let names = ["a".to_string(), "b".to_string(), "c".to_string()];
        let e = column_json(
            &col(MYSQL_TYPE_ENUM, 45),
            &BinlogValue::Value(Value::Int(2)),
            Some(&names),
        );
        assert_eq!(e, Ok(serde_json::json!("b")));
        let s = column_json(
            &col(MYSQL_TYPE_SET, 45),
            &BinlogValue::Value(Value::Bytes(vec![5])),
            Some(&names),
        );
        assert_eq!(s, Ok(serde_json::json!("a,c")));
        assert_eq!(j(MYSQL_TYPE_VARCHAR, Value::NULL), Json::Null);
    }
}
