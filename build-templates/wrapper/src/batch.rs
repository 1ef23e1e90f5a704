//! Pure batching helpers: which requests may share a handler call, how their inputs are
//! concatenated along the first dimension, and how outputs are split back.

use crate::tensor::{Data, DataType, Tensor, element_count};

/// What must match for two requests to share a batch: input names, datatypes and every
/// dimension but the first, in order.
pub type BatchKey = Vec<(String, DataType, Vec<usize>)>;

/// The rows a request contributes and its batch key; None when it cannot be batched (no
/// inputs, a scalar input, or inputs whose first dimensions differ).
pub fn batch_key(inputs: &[Tensor]) -> Option<(usize, BatchKey)> {
    let rows = *inputs.first()?.shape.first()?;
    let mut key = Vec::with_capacity(inputs.len());
    for t in inputs {
        if t.shape.first() != Some(&rows) {
            return None;
        }
        key.push((t.name.clone(), t.datatype, t.shape[1..].to_vec()));
    }
    Some((rows, key))
}

/// Concatenates requests with equal batch keys along the first dimension.
pub fn concat(requests: Vec<Vec<Tensor>>) -> Vec<Tensor> {
    let mut requests = requests.into_iter();
    let Some(mut merged) = requests.next() else {
        return Vec::new();
    };
    for request in requests {
        for (into, from) in merged.iter_mut().zip(request) {
            into.shape[0] += from.shape[0];
            match (&mut into.data, from.data) {
                (Data::Raw(a), Data::Raw(b)) => a.extend_from_slice(&b),
                (Data::Strings(a), Data::Strings(b)) => a.extend(b),
                _ => unreachable!("equal batch keys mean equal datatypes"),
            }
        }
    }
    merged
}

/// Splits a batch's outputs back into one output list per request, by the rows each request
/// contributed. Every output must have one row per input row.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    let total: usize = rows.iter().sum();
    for t in &outputs {
        if t.shape.first() != Some(&total) {
            return Err(format!(
                "with batching on, every output needs one row per input row: output {:?} has \
                 shape {:?} but the batch has {total} rows (return a row per input row, or run \
                 with --max-batch-size 1)",
                t.name, t.shape
            ));
        }
    }
    let mut parts: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for t in outputs {
        let per_row = element_count(&t.shape[1..]).unwrap_or(0);
        let mut start = 0;
        for (part, &n) in parts.iter_mut().zip(rows) {
            let mut shape = t.shape.clone();
            shape[0] = n;
            let data = match &t.data {
                Data::Raw(b) => {
                    let size = t.datatype.wire().size();
                    Data::Raw(b[start * per_row * size..(start + n) * per_row * size].to_vec())
                }
                Data::Strings(s) => {
                    Data::Strings(s[start * per_row..(start + n) * per_row].to_vec())
                }
            };
            part.push(Tensor {
                name: t.name.clone(),
                datatype: t.datatype,
                shape,
                data,
            });
            start += n;
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp32(name: &str, shape: &[i64], data: serde_json::Value) -> Tensor {
        Tensor::from_v2(name, "FP32", shape, &data).unwrap()
    }

    #[test]
    fn keys_decide_what_batches_together() {
        let a = vec![fp32("x", &[2, 3], json!([1, 2, 3, 4, 5, 6]))];
        let b = vec![fp32("x", &[1, 3], json!([7, 8, 9]))];
        let other_width = vec![fp32("x", &[1, 2], json!([1, 2]))];
        let other_name = vec![fp32("y", &[1, 3], json!([1, 2, 3]))];
        let (rows_a, key_a) = batch_key(&a).unwrap();
        let (rows_b, key_b) = batch_key(&b).unwrap();
        assert_eq!((rows_a, rows_b), (2, 1));
        assert_eq!(key_a, key_b);
        assert_ne!(key_a, batch_key(&other_width).unwrap().1);
        assert_ne!(key_a, batch_key(&other_name).unwrap().1);

        let scalar = vec![fp32("x", &[], json!(1))];
        assert!(batch_key(&scalar).is_none());
        assert!(batch_key(&[]).is_none());
        let ragged = vec![
            fp32("x", &[2], json!([1, 2])),
            fp32("y", &[3], json!([1, 2, 3])),
        ];
        assert!(batch_key(&ragged).is_none());
    }

    #[test]
    fn concat_then_split_restores_each_request() {
        let a = vec![
            fp32("x", &[2, 2], json!([1, 2, 3, 4])),
            Tensor::from_v2("s", "BYTES", &[2], &json!(["a", "b"])).unwrap(),
        ];
        let b = vec![
            fp32("x", &[1, 2], json!([5, 6])),
            Tensor::from_v2("s", "BYTES", &[1], &json!(["c"])).unwrap(),
        ];
        let merged = concat(vec![a.clone(), b.clone()]);
        assert_eq!(merged[0], fp32("x", &[3, 2], json!([1, 2, 3, 4, 5, 6])));
        assert_eq!(merged[1].shape, vec![3]);
        let parts = split(merged, &[2, 1]).unwrap();
        assert_eq!(parts, vec![a, b]);
    }

    #[test]
    fn split_rejects_outputs_without_a_row_per_input() {
        let out = vec![fp32("y", &[2], json!([1, 2]))];
        let err = split(out, &[2, 1]).unwrap_err();
        assert!(
            err.contains("output \"y\" has shape [2] but the batch has 3 rows"),
            "{err}"
        );
        let scalar = vec![fp32("y", &[], json!(1))];
        assert!(split(scalar, &[1]).is_err());
    }
}
