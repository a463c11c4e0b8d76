//! The after-images of write-rows events, decoded with mysql_common's own
//! value decoder but kept only for the columns the outbox mapping uses.
//!
//! mysql_common's `BinlogRow` builds a full `Column` (seven allocations) for
//! every column of every row, and owned copies of every value; while
//! draining, that was the largest part of the relay's CPU (BENCHMARKS.md).
//! Here the column layout is read once per table map, every value is parsed
//! in place (borrowed), and only the mapped ones are copied out.

use std::io;
use std::sync::Arc;

use mysql_async::binlog::events::{OptionalMetadataField, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
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
    pub fn new(
        tme: &TableMapEvent<'_>,
        names: &[String],
        wanted: impl Fn(usize) -> bool,
    ) -> Result<RowLayout, String> {
        let count = tme.columns_count() as usize;
        let mut unsigned_flags: Vec<bool> = Vec::new();
        for field in tme.iter_optional_meta() {
            if let Ok(OptionalMetadataField::Signedness(bits)) = field {
                unsigned_flags = bits.iter().by_vals().collect();
            }
        }
        let mut numeric = 0;
        let mut columns = Vec::with_capacity(count);
        for i in 0..count {
            let ty = tme
                .get_column_type(i)
                .map_err(|e| format!("column {i}: {e}"))?
                .ok_or_else(|| format!("column {i} has no type in the table map"))?;
            let unsigned = if ty.is_numeric_type() {
                numeric += 1;
                unsigned_flags.get(numeric - 1).copied().unwrap_or(false)
            } else {
                false
            };
            columns.push(ColumnLayout {
                ty,
                meta: tme.get_column_metadata(i).unwrap_or(&[]).to_vec(),
                unsigned,
                wanted: wanted(i),
            });
        }
        let names = (0..count)
            .map(|i| {
                let mut c = Column::new(columns[i].ty);
                if let Some(n) = names.get(i) {
                    c = c.with_name(n.as_bytes());
                }
                c
            })
            .collect();
        Ok(RowLayout { columns, names })
    }

    /// The after-image of every row of a write-rows event.
    pub fn after_images<'a>(&'a self, rows: &'a RowsEventData<'a>) -> AfterImages<'a> {
        let present: Vec<bool> = rows
            .columns_after_image()
            .map(|bits| bits.iter().by_vals().collect())
            .unwrap_or_default();
        AfterImages {
            layout: self,
            in_image: present.iter().filter(|p| **p).count(),
            present,
            buf: ParseBuf(rows.rows_data()),
        }
    }
}

/// Rows of a write-rows event; values of unwanted columns are `None`.
pub struct AfterImages<'a> {
    layout: &'a RowLayout,
    /// Which columns the image holds (all of them with binlog_row_image=FULL).
    present: Vec<bool>,
    /// How many columns each image holds.
    in_image: usize,
    buf: ParseBuf<'a>,
}

impl Iterator for AfterImages<'_> {
    type Item = io::Result<BinlogRow>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.row())
    }
}

impl AfterImages<'_> {
    fn row(&mut self) -> io::Result<BinlogRow> {
        let in_image = self.in_image;
        let nulls: &[u8] = self.buf.parse(in_image.div_ceil(8))?;
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
            let v: BinlogValue<'_> =
                self.buf
                    .parse((c.ty, c.meta.as_slice(), c.unsigned, false))?;
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
