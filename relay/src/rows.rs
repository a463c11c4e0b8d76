//! Row images of rows events, decoded with mysql_common's own value decoder
//! (but for one value it gets wrong, below) and kept only for the columns
//! the mapping uses.
//!
//! mysql_common's `BinlogRow` builds a full `Column` (seven allocations) for
//! every column of every row, and owned copies of every value; while
//! draining, that was the largest part of the relay's CPU (BENCHMARKS.md).
//! Here the column layout is read once per table map, every value is parsed
//! in place (borrowed), and only the mapped ones are copied out.
//!
//! mysql_common 0.37 gets two kinds of values wrong, decoded here instead:
//! a negative `TIME(1)`/`TIME(2)` with a fraction (it panics in debug
//! builds and returns garbage in release: `frac -= 0x100` on a u32), and a
//! negative signed `MEDIUMINT` (not sign-extended: -1 reads as 16777215).

use std::io;
use std::sync::Arc;

use mysql_async::binlog::events::{OptionalMetaExtractor, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::{Column, Value};
use mysql_common::io::ParseBuf;

/// How one column is stored in a row image.
#[derive(Debug, Clone)]
struct ColumnLayout {
    ty: ColumnType,
    meta: Vec<u8>,
    unsigned: bool,
    /// The mapping reads this column: its value is kept.
    wanted: bool,
}

/// A table's row layout, from its table map event.
#[derive(Debug, Clone)]
pub struct RowLayout {
    columns: Vec<ColumnLayout>,
    /// Shared by every row (`BinlogRow` carries its columns).
    names: Arc<[Column]>,
}

impl RowLayout {
    /// The layout of `tme`'s table; `wanted(i)` says which columns to keep.
    /// Its columns carry their name, character set and primary-key flag.
    pub fn new(
        tme: &TableMapEvent<'_>,
        names: &[String],
        wanted: impl Fn(usize) -> bool,
    ) -> Result<RowLayout, String> {
        let count = tme.columns_count() as usize;
        let meta =
            OptionalMetaExtractor::new(tme.iter_optional_meta()).map_err(|e| e.to_string())?;
        let mut unsigned = meta.iter_signedness();
        let mut charsets = meta.iter_charset();
        let mut enum_charsets = meta.iter_enum_and_set_charset();
        let primary: Vec<u64> = meta.iter_primary_key().filter_map(Result::ok).collect();
        let mut columns = Vec::with_capacity(count);
        let mut named = Vec::with_capacity(count);
        for i in 0..count {
            let ty = tme
                .get_column_type(i)
                .map_err(|e| format!("column {i}: {e}"))?
                .ok_or_else(|| format!("column {i} has no type in the table map"))?;
            let is_unsigned = ty.is_numeric_type() && unsigned.next().unwrap_or(false);
            let charset = if ty.is_character_type() {
                charsets.next().and_then(Result::ok).unwrap_or_default()
            } else if ty.is_enum_or_set_type() {
                enum_charsets
                    .next()
                    .and_then(Result::ok)
                    .unwrap_or_default()
            } else {
                0
            };
            let mut flags = ColumnFlags::empty();
            if is_unsigned {
                flags |= ColumnFlags::UNSIGNED_FLAG;
            }
            if primary.contains(&(i as u64)) {
                flags |= ColumnFlags::PRI_KEY_FLAG;
            }
            let mut c = Column::new(ty)
                .with_flags(flags)
                .with_character_set(charset);
            if let Some(n) = names.get(i) {
                c = c.with_name(n.as_bytes());
            }
            named.push(c);
            columns.push(ColumnLayout {
                ty,
                meta: tme.get_column_metadata(i).unwrap_or(&[]).to_vec(),
                unsigned: is_unsigned,
                wanted: wanted(i),
            });
        }
        Ok(RowLayout {
            columns,
            names: named.into(),
        })
    }

    /// The after-image of every row of a write-rows event.
    pub fn after_images<'a>(&'a self, rows: &'a RowsEventData<'a>) -> AfterImages<'a> {
        let present: Vec<bool> = rows
            .columns_after_image()
            .map(|bits| bits.iter().by_vals().collect())
            .unwrap_or_default();
        AfterImages {
            image: Image::new(self, present),
            buf: ParseBuf(rows.rows_data()),
        }
    }

    /// `(before, after)` of every row of a rows event: an insert has no
    /// before-image, a delete no after-image.
    pub fn images<'a>(&'a self, rows: &'a RowsEventData<'a>) -> io::Result<Images<'a>> {
        if matches!(rows, RowsEventData::PartialUpdateRowsEvent(_)) {
            return Err(io::Error::other(
                "a partial JSON update (binlog_row_value_options=PARTIAL_JSON) has no full \
                 row image: set binlog_row_value_options to ''",
            ));
        }
        Ok(Images {
            before: rows
                .columns_before_image()
                .map(|b| Image::new(self, b.iter().by_vals().collect())),
            after: rows
                .columns_after_image()
                .map(|b| Image::new(self, b.iter().by_vals().collect())),
            buf: ParseBuf(rows.rows_data()),
        })
    }
}

/// Which columns one image of an event holds.
struct Image<'a> {
    layout: &'a RowLayout,
    /// Which columns the image holds (all of them with binlog_row_image=FULL).
    present: Vec<bool>,
    /// How many columns each image holds.
    in_image: usize,
}

impl<'a> Image<'a> {
    fn new(layout: &'a RowLayout, present: Vec<bool>) -> Image<'a> {
        Image {
            layout,
            in_image: present.iter().filter(|p| **p).count(),
            present,
        }
    }

    fn row(&self, buf: &mut ParseBuf<'a>) -> io::Result<BinlogRow> {
        let in_image = self.in_image;
        let nulls: &[u8] = buf.parse(in_image.div_ceil(8))?;
        let mut values = Vec::with_capacity(in_image);
        let mut at = 0;
        for (c, present) in self.layout.columns.iter().zip(&self.present) {
            if !present {
                continue;
            }
            let null = nulls[at / 8] & (1 << (at % 8)) != 0;
            at += 1;
            if null {
                values.push(Some(BinlogValue::Value(Value::NULL)));
                continue;
            }
            let v: BinlogValue<'_> = if short_fraction_time(c) {
                let raw: &[u8] = buf.parse(4)?;
                BinlogValue::Value(time2_short_fraction(raw))
            } else if c.ty == ColumnType::MYSQL_TYPE_INT24 && !c.unsigned {
                let raw: &[u8] = buf.parse(3)?;
                BinlogValue::Value(Value::Int(i24(raw)))
            } else {
                buf.parse((c.ty, c.meta.as_slice(), c.unsigned, false))?
            };
            values.push(c.wanted.then(|| v.into_owned()));
        }
        let columns = if in_image == self.layout.columns.len() {
            self.layout.names.clone()
        } else {
            // Not a FULL row image (preflight refuses that server setting):
            // the row's columns are the ones it holds, as mysql_common has it.
            self.layout
                .names
                .iter()
                .zip(&self.present)
                .filter(|(_, p)| **p)
                .map(|(c, _)| c.clone())
                .collect()
        };
        Ok(BinlogRow::new(values, columns))
    }
}

/// mysql_common decodes this column's values wrong: a TIME(1) or TIME(2).
fn short_fraction_time(c: &ColumnLayout) -> bool {
    c.ty == ColumnType::MYSQL_TYPE_TIME2 && matches!(c.meta.first(), Some(1 | 2))
}

/// A signed little-endian 3-byte integer.
fn i24(raw: &[u8]) -> i64 {
    (((raw[2] as i32) << 24 | (raw[1] as i32) << 16 | (raw[0] as i32) << 8) >> 8) as i64
}

/// MySQL's `my_time_packed_from_binary` for 1 or 2 fractional digits: a
/// 3-byte integer part (offset 0x800000) and one byte of hundredths.
fn time2_short_fraction(raw: &[u8]) -> Value {
    let mut intpart = ((raw[0] as i64) << 16 | (raw[1] as i64) << 8 | raw[2] as i64) - 0x80_0000;
    let mut frac = raw[3] as i64;
    if intpart < 0 && frac > 0 {
        intpart += 1;
        frac -= 0x100;
    }
    mysql_common::binlog::misc::time_from_packed((intpart << 24) + frac * 10_000)
}

/// Rows of any rows event, both images.
pub struct Images<'a> {
    before: Option<Image<'a>>,
    after: Option<Image<'a>>,
    buf: ParseBuf<'a>,
}

impl Iterator for Images<'_> {
    type Item = io::Result<(Option<BinlogRow>, Option<BinlogRow>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let before = match &self.before {
            Some(i) => match i.row(&mut self.buf) {
                Ok(r) => Some(r),
                Err(e) => return Some(Err(e)),
            },
            None => None,
        };
        let after = match &self.after {
            Some(i) => match i.row(&mut self.buf) {
                Ok(r) => Some(r),
                Err(e) => return Some(Err(e)),
            },
            None => None,
        };
        Some(Ok((before, after)))
    }
}

/// Rows of a write-rows event; values of unwanted columns are `None`.
pub struct AfterImages<'a> {
    image: Image<'a>,
    buf: ParseBuf<'a>,
}

impl Iterator for AfterImages<'_> {
    type Item = io::Result<BinlogRow>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.image.row(&mut self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 4 bytes MySQL writes for TIME(2): integer part + 0x800000, and
    /// the hundredths (a negative value with a fraction borrows one).
    fn enc(intpart: i64, frac: u8) -> [u8; 4] {
        let u = (intpart + 0x80_0000) as u32;
        [(u >> 16) as u8, (u >> 8) as u8, u as u8, frac]
    }

    #[test]
    fn signed_mediumint_is_sign_extended() {
        assert_eq!(i24(&[0x00, 0x00, 0x80]), -8_388_608);
        assert_eq!(i24(&[0xff, 0xff, 0xff]), -1);
        assert_eq!(i24(&[0xff, 0xff, 0x7f]), 8_388_607);
        assert_eq!(i24(&[1, 0, 0]), 1);
    }

    #[test]
    fn short_fraction_times_decode_like_mysql() {
        let hms = |h: i64, m: i64, s: i64| (h << 12) | (m << 6) | s;
        assert_eq!(
            time2_short_fraction(&enc(-hms(838, 59, 58) - 1, 157)),
            Value::Time(true, 34, 22, 59, 58, 990_000),
            "-838:59:58.99"
        );
        assert_eq!(
            time2_short_fraction(&enc(-1, 255)),
            Value::Time(true, 0, 0, 0, 0, 10_000),
            "-00:00:00.01"
        );
        assert_eq!(
            time2_short_fraction(&enc(-hms(1, 0, 0), 0)),
            Value::Time(true, 0, 1, 0, 0, 0),
            "-01:00:00.00"
        );
        assert_eq!(
            time2_short_fraction(&enc(hms(12, 34, 56), 78)),
            Value::Time(false, 0, 12, 34, 56, 780_000),
            "12:34:56.78"
        );
    }
}
