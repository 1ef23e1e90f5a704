//! Tensors as the wrapper holds them: a name, a datatype, a shape and the elements already
//! encoded the way the Python worker reads them (little-endian, row-major), so a request is
//! parsed once and a batch is a byte concatenation.

use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::Value;

/// Open Inference Protocol datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bf16,
    Bytes,
}

const ALL: [DataType; 14] = [
    DataType::Bool,
    DataType::U8,
    DataType::U16,
    DataType::U32,
    DataType::U64,
    DataType::I8,
    DataType::I16,
    DataType::I32,
    DataType::I64,
    DataType::F16,
    DataType::F32,
    DataType::F64,
    DataType::Bf16,
    DataType::Bytes,
];

/// How one element travels over the worker pipe. Half-precision types travel as `f4` and the
/// worker converts, which keeps float16 rounding out of the Rust side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F32,
    F64,
    Str,
}

impl Wire {
    /// The code the worker understands (numpy dtype strings, little-endian).
    pub fn code(self) -> &'static str {
        match self {
            Wire::Bool => "b1",
            Wire::U8 => "u1",
            Wire::U16 => "u2",
            Wire::U32 => "u4",
            Wire::U64 => "u8",
            Wire::I8 => "i1",
            Wire::I16 => "i2",
            Wire::I32 => "i4",
            Wire::I64 => "i8",
            Wire::F32 => "f4",
            Wire::F64 => "f8",
            Wire::Str => "str",
        }
    }

    pub fn from_code(code: &str) -> Option<Wire> {
        [
            Wire::Bool,
            Wire::U8,
            Wire::U16,
            Wire::U32,
            Wire::U64,
            Wire::I8,
            Wire::I16,
            Wire::I32,
            Wire::I64,
            Wire::F32,
            Wire::F64,
            Wire::Str,
        ]
        .into_iter()
        .find(|w| w.code() == code)
    }

    /// Bytes per element; 0 for strings, which travel as JSON.
    pub fn size(self) -> usize {
        match self {
            Wire::Bool | Wire::U8 | Wire::I8 => 1,
            Wire::U16 | Wire::I16 => 2,
            Wire::U32 | Wire::I32 | Wire::F32 => 4,
            Wire::U64 | Wire::I64 | Wire::F64 => 8,
            Wire::Str => 0,
        }
    }
}

impl DataType {
    pub fn parse(s: &str) -> Option<DataType> {
        ALL.into_iter().find(|d| d.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bf16 => "BF16",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn wire(self) -> Wire {
        match self {
            DataType::Bool => Wire::Bool,
            DataType::U8 => Wire::U8,
            DataType::U16 => Wire::U16,
            DataType::U32 => Wire::U32,
            DataType::U64 => Wire::U64,
            DataType::I8 => Wire::I8,
            DataType::I16 => Wire::I16,
            DataType::I32 => Wire::I32,
            DataType::I64 => Wire::I64,
            DataType::F16 | DataType::F32 | DataType::Bf16 => Wire::F32,
            DataType::F64 => Wire::F64,
            DataType::Bytes => Wire::Str,
        }
    }

    fn allowed() -> String {
        ALL.map(DataType::as_str).join(", ")
    }
}

/// The elements of a tensor: encoded numbers, or strings for BYTES.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Raw(Vec<u8>),
    Strings(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: Data,
}

/// Elements a shape holds, or None when the product overflows.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// Builds a tensor from an Open Inference Protocol input; `data` may be flat or nested.
    /// Errors are messages for a 400 answer.
    pub fn from_v2(
        name: &str,
        datatype: &str,
        shape: &[i64],
        data: &Value,
    ) -> Result<Tensor, String> {
        let dt = DataType::parse(datatype).ok_or_else(|| {
            format!(
                "input {name:?} has unknown datatype {datatype:?}; expected one of {}",
                DataType::allowed()
            )
        })?;
        let shape = shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format!("input {name:?} has a negative dimension in shape {shape:?}"))?;
        let want = element_count(&shape)
            .ok_or_else(|| format!("input {name:?}: shape {shape:?} is too large"))?;
        let mut enc = Encoder::new(dt, want);
        enc.push_nested(data)
            .map_err(|e| format!("input {name:?} ({datatype}): {e}"))?;
        if enc.count != want {
            return Err(format!(
                "input {name:?}: shape {shape:?} needs {want} elements but data has {}",
                enc.count
            ));
        }
        Ok(Tensor {
            name: name.to_string(),
            datatype: dt,
            shape,
            data: enc.finish(),
        })
    }

    /// Builds a tensor from KServe v1 `instances`: the shape comes from the nesting (which
    /// must be rectangular) and the datatype from the values (BOOL, INT64, FP64 or BYTES).
    pub fn from_instances(name: &str, instances: &Value) -> Result<Tensor, String> {
        let mut shape = Vec::new();
        let mut level = instances;
        while let Value::Array(items) = level {
            shape.push(items.len());
            match items.first() {
                Some(first) => level = first,
                None => break,
            }
        }
        let mut kinds = Kinds::default();
        scan(instances, &shape, 0, &mut kinds)?;
        let dt = kinds.datatype()?;
        let want = element_count(&shape).ok_or("instances are too large")?;
        let mut enc = Encoder::new(dt, want);
        enc.push_nested(instances)?;
        Ok(Tensor {
            name: name.to_string(),
            datatype: dt,
            shape,
            data: enc.finish(),
        })
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::Raw(b) => b.len() / self.datatype.wire().size().max(1),
            Data::Strings(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, flat, for a JSON answer.
    pub fn flat(&self) -> DataView<'_> {
        DataView {
            tensor: self,
            nested: false,
        }
    }

    /// The elements nested by shape (KServe v1 `predictions`).
    pub fn nested(&self) -> DataView<'_> {
        DataView {
            tensor: self,
            nested: true,
        }
    }

    /// Row `i` along the first dimension, as a tensor of the remaining dimensions.
    pub fn row(&self, i: usize) -> Tensor {
        let rest = self.shape[1..].to_vec();
        let per = element_count(&rest).unwrap_or(0);
        Tensor {
            name: self.name.clone(),
            datatype: self.datatype,
            data: self.slice_elements(i * per, per),
            shape: rest,
        }
    }

    fn slice_elements(&self, start: usize, count: usize) -> Data {
        match &self.data {
            Data::Raw(b) => {
                let size = self.datatype.wire().size();
                Data::Raw(b[start * size..(start + count) * size].to_vec())
            }
            Data::Strings(s) => Data::Strings(s[start..start + count].to_vec()),
        }
    }
}

/// Which JSON value kinds a v1 `instances` array holds, to pick one datatype for all of them.
#[derive(Default)]
struct Kinds {
    bools: bool,
    ints: bool,
    floats: bool,
    strings: bool,
}

impl Kinds {
    fn datatype(&self) -> Result<DataType, String> {
        match (self.bools, self.ints || self.floats, self.strings) {
            (false, false, true) => Ok(DataType::Bytes),
            (true, false, false) => Ok(DataType::Bool),
            (false, true, false) if self.floats => Ok(DataType::F64),
            (false, true, false) => Ok(DataType::I64),
            // An empty array: the handler still gets a (zero-size) float tensor.
            (false, false, false) => Ok(DataType::F64),
            _ => Err(
                "instances mix value types; use all numbers, all booleans or all strings"
                    .to_string(),
            ),
        }
    }
}

fn scan(v: &Value, shape: &[usize], depth: usize, kinds: &mut Kinds) -> Result<(), String> {
    match v {
        Value::Array(items) => {
            if shape.get(depth) != Some(&items.len()) {
                return Err(format!(
                    "instances are not a rectangular array (expected shape {shape:?})"
                ));
            }
            items
                .iter()
                .try_for_each(|item| scan(item, shape, depth + 1, kinds))
        }
        _ if depth != shape.len() => Err(format!(
            "instances are not a rectangular array (expected shape {shape:?})"
        )),
        Value::Bool(_) => {
            kinds.bools = true;
            Ok(())
        }
        Value::Number(n) => {
            if n.is_f64() {
                kinds.floats = true;
            } else {
                kinds.ints = true;
            }
            Ok(())
        }
        Value::String(_) => {
            kinds.strings = true;
            Ok(())
        }
        Value::Null | Value::Object(_) => Err(
            "instances must hold numbers, booleans or strings (objects and nulls are not supported)"
                .to_string(),
        ),
    }
}

/// Encodes JSON elements into the wire form of one datatype.
struct Encoder {
    dt: DataType,
    raw: Vec<u8>,
    strings: Vec<String>,
    count: usize,
}

impl Encoder {
    fn new(dt: DataType, expected: usize) -> Self {
        // Cap the reservation: the shape is client input and may lie about the size.
        let reserve = expected.min(1 << 20);
        let (raw, strings) = match dt.wire() {
            Wire::Str => (Vec::new(), Vec::with_capacity(reserve)),
            w => (Vec::with_capacity(reserve * w.size()), Vec::new()),
        };
        Encoder {
            dt,
            raw,
            strings,
            count: 0,
        }
    }

    fn push_nested(&mut self, v: &Value) -> Result<(), String> {
        match v {
            Value::Array(items) => items.iter().try_for_each(|item| self.push_nested(item)),
            scalar => self.push(scalar),
        }
    }

    fn push(&mut self, v: &Value) -> Result<(), String> {
        let wrong = || {
            format!(
                "element {} is {v}, not a {} value",
                self.count,
                self.dt.as_str()
            )
        };
        match self.dt.wire() {
            Wire::Bool => self.raw.push(v.as_bool().ok_or_else(wrong)? as u8),
            Wire::Str => self.strings.push(v.as_str().ok_or_else(wrong)?.to_string()),
            Wire::F32 => {
                let x = v.as_f64().ok_or_else(wrong)?;
                self.raw.extend_from_slice(&(x as f32).to_le_bytes());
            }
            Wire::F64 => {
                let x = v.as_f64().ok_or_else(wrong)?;
                self.raw.extend_from_slice(&x.to_le_bytes());
            }
            w => {
                let out_of_range = || {
                    format!(
                        "element {} is {v}, out of range for {}",
                        self.count,
                        self.dt.as_str()
                    )
                };
                // Integers must be JSON integers: silently truncating 1.5 would hide bugs.
                if let Some(x) = v.as_i64() {
                    match w {
                        Wire::U8 => self.raw.push(u8::try_from(x).map_err(|_| out_of_range())?),
                        Wire::U16 => self.raw.extend_from_slice(
                            &u16::try_from(x).map_err(|_| out_of_range())?.to_le_bytes(),
                        ),
                        Wire::U32 => self.raw.extend_from_slice(
                            &u32::try_from(x).map_err(|_| out_of_range())?.to_le_bytes(),
                        ),
                        Wire::U64 => self.raw.extend_from_slice(
                            &u64::try_from(x).map_err(|_| out_of_range())?.to_le_bytes(),
                        ),
                        Wire::I8 => self.raw.extend_from_slice(
                            &i8::try_from(x).map_err(|_| out_of_range())?.to_le_bytes(),
                        ),
                        Wire::I16 => self.raw.extend_from_slice(
                            &i16::try_from(x).map_err(|_| out_of_range())?.to_le_bytes(),
                        ),
                        Wire::I32 => self.raw.extend_from_slice(
                            &i32::try_from(x).map_err(|_| out_of_range())?.to_le_bytes(),
                        ),
                        Wire::I64 => self.raw.extend_from_slice(&x.to_le_bytes()),
                        _ => unreachable!("non-integer wires are handled above"),
                    }
                } else if let (Wire::U64, Some(x)) = (w, v.as_u64()) {
                    self.raw.extend_from_slice(&x.to_le_bytes());
                } else if v.is_u64() {
                    return Err(out_of_range());
                } else {
                    return Err(wrong());
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    fn finish(self) -> Data {
        match self.dt.wire() {
            Wire::Str => Data::Strings(self.strings),
            _ => Data::Raw(self.raw),
        }
    }
}

/// Serializes a tensor's elements straight from the wire bytes, FP32 with f32's shortest
/// form (so 0.1f32 prints as 0.1, not 0.10000000149011612).
pub struct DataView<'a> {
    tensor: &'a Tensor,
    nested: bool,
}

impl Serialize for DataView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let t = self.tensor;
        let total = t.len();
        if self.nested && !t.shape.is_empty() {
            serialize_nested(t, &t.shape, 0, serializer)
        } else if self.nested {
            // A scalar (shape []) is one bare value.
            Element(t, 0).serialize(serializer)
        } else {
            let mut seq = serializer.serialize_seq(Some(total))?;
            for i in 0..total {
                seq.serialize_element(&Element(t, i))?;
            }
            seq.end()
        }
    }
}

fn serialize_nested<S: Serializer>(
    t: &Tensor,
    shape: &[usize],
    offset: usize,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    struct Level<'a>(&'a Tensor, &'a [usize], usize);
    impl Serialize for Level<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize_nested(self.0, self.1, self.2, s)
        }
    }
    let mut seq = serializer.serialize_seq(Some(shape[0]))?;
    let inner = &shape[1..];
    let stride = element_count(inner).unwrap_or(0);
    for i in 0..shape[0] {
        if inner.is_empty() {
            seq.serialize_element(&Element(t, offset + i))?;
        } else {
            seq.serialize_element(&Level(t, inner, offset + i * stride))?;
        }
    }
    seq.end()
}

struct Element<'a>(&'a Tensor, usize);

impl Serialize for Element<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Element(t, i) = *self;
        let raw = match &t.data {
            Data::Strings(v) => return s.serialize_str(&v[i]),
            Data::Raw(b) => b,
        };
        let wire = t.datatype.wire();
        let size = wire.size();
        let b = &raw[i * size..(i + 1) * size];
        match wire {
            Wire::Bool => s.serialize_bool(b[0] != 0),
            Wire::U8 => s.serialize_u8(b[0]),
            Wire::U16 => s.serialize_u16(u16::from_le_bytes([b[0], b[1]])),
            Wire::U32 => s.serialize_u32(u32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Wire::U64 => s.serialize_u64(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
            Wire::I8 => s.serialize_i8(b[0] as i8),
            Wire::I16 => s.serialize_i16(i16::from_le_bytes([b[0], b[1]])),
            Wire::I32 => s.serialize_i32(i32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Wire::I64 => s.serialize_i64(i64::from_le_bytes(b.try_into().expect("8 bytes"))),
            Wire::F32 => s.serialize_f32(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Wire::F64 => s.serialize_f64(f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            Wire::Str => unreachable!("strings are handled above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_flat_data_encode_the_same() {
        let flat = Tensor::from_v2("x", "FP32", &[2, 2], &json!([1, 2.5, 3, 4])).unwrap();
        let nested = Tensor::from_v2("x", "FP32", &[2, 2], &json!([[1, 2.5], [3, 4]])).unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.len(), 4);
        let Data::Raw(raw) = &flat.data else {
            panic!("numbers are raw")
        };
        assert_eq!(&raw[4..8], &2.5f32.to_le_bytes());
    }

    #[test]
    fn v2_errors_are_clear() {
        let cases: &[(&str, &[i64], Value, &str)] = &[
            ("FP33", &[1], json!([1]), "unknown datatype \"FP33\""),
            (
                "FP32",
                &[2, 3],
                json!([1, 2, 3, 4, 5]),
                "needs 6 elements but data has 5",
            ),
            ("FP32", &[-1], json!([1]), "negative dimension"),
            ("INT32", &[1], json!([1.5]), "not a INT32 value"),
            ("UINT8", &[1], json!([300]), "out of range for UINT8"),
            ("UINT8", &[1], json!([-1]), "out of range for UINT8"),
            ("INT64", &[1], json!([u64::MAX]), "out of range for INT64"),
            ("BOOL", &[1], json!([1]), "not a BOOL value"),
            ("BYTES", &[1], json!([1]), "not a BYTES value"),
            ("FP64", &[1], json!(["a"]), "not a FP64 value"),
            ("FP32", &[i64::MAX, i64::MAX], json!([]), "too large"),
        ];
        for (dt, shape, data, want) in cases {
            let err = Tensor::from_v2("x", dt, shape, data).unwrap_err();
            assert!(err.contains(want), "{dt} {shape:?} {data}: {err}");
            assert!(err.contains("\"x\""), "names the input: {err}");
        }
    }

    #[test]
    fn every_datatype_round_trips_to_json() {
        let cases = [
            ("BOOL", json!([true, false])),
            ("UINT8", json!([0, 255])),
            ("UINT16", json!([0, 65535])),
            ("UINT32", json!([0, 4294967295u64])),
            ("UINT64", json!([0, u64::MAX])),
            ("INT8", json!([-128, 127])),
            ("INT16", json!([-32768, 32767])),
            ("INT32", json!([i32::MIN, i32::MAX])),
            ("INT64", json!([i64::MIN, i64::MAX])),
            ("FP16", json!([0.5, -2.0])),
            ("FP32", json!([0.1, -2.5])),
            ("FP64", json!([0.1, 1e300])),
            ("BF16", json!([1.0, 2.0])),
            ("BYTES", json!(["a", "ü"])),
        ];
        for (dt, data) in cases {
            let t = Tensor::from_v2("x", dt, &[2], &data).unwrap();
            assert_eq!(t.datatype.as_str(), dt);
            // Through text, as clients see it (to_value would widen f32 to f64 first).
            let text = serde_json::to_string(&t.flat()).unwrap();
            assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap(),
                data,
                "{dt}: {text}"
            );
        }
    }

    #[test]
    fn nested_view_follows_shape() {
        let t = Tensor::from_v2("x", "INT64", &[2, 3], &json!([1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(
            serde_json::to_value(t.nested()).unwrap(),
            json!([[1, 2, 3], [4, 5, 6]])
        );
        assert_eq!(
            serde_json::to_value(t.row(1).nested()).unwrap(),
            json!([4, 5, 6])
        );
        let scalar = Tensor::from_v2("x", "FP64", &[], &json!(2.5)).unwrap();
        assert_eq!(serde_json::to_value(scalar.nested()).unwrap(), json!(2.5));
    }

    #[test]
    fn instances_pick_shape_and_datatype() {
        let t = Tensor::from_instances("input-0", &json!([[1, 2], [3, 4.5]])).unwrap();
        assert_eq!((t.datatype, t.shape.clone()), (DataType::F64, vec![2, 2]));
        let t = Tensor::from_instances("input-0", &json!([[1, 2], [3, 4]])).unwrap();
        assert_eq!(t.datatype, DataType::I64);
        let t = Tensor::from_instances("input-0", &json!(["a", "b"])).unwrap();
        assert_eq!((t.datatype, t.shape.clone()), (DataType::Bytes, vec![2]));
        let t = Tensor::from_instances("input-0", &json!([true])).unwrap();
        assert_eq!(t.datatype, DataType::Bool);
        for (bad, want) in [
            (json!([[1, 2], [3]]), "rectangular"),
            (json!([[1, 2], 3]), "rectangular"),
            (json!([1, "a"]), "mix value types"),
            (json!([{"a": 1}]), "objects"),
            (json!([null]), "nulls"),
        ] {
            let err = Tensor::from_instances("input-0", &bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
