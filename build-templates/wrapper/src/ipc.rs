//! The pipe protocol between the wrapper and a Python worker (see `worker.py`).
//!
//! Every message is a frame: a little-endian u32 length, then that many bytes. The first
//! byte names the message. Tensors travel as a small JSON header (names, datatypes, shapes,
//! byte counts) followed by one blob of raw little-endian elements, so the worker turns them
//! into arrays with `numpy.frombuffer` instead of parsing numbers.
//!
//! wrapper → worker: `I` header blob (run the handler)
//! worker → wrapper: `R` json (loaded) | `E` json (load failed) | `O` header blob (outputs) |
//! `X` json (the handler raised)

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tensor::{Data, DataType, Tensor, Wire, element_count};

/// Frames above this are a protocol error rather than an allocation the worker asked for.
const MAX_FRAME: usize = 1 << 31;

#[derive(Serialize, Deserialize)]
struct WireTensor {
    name: String,
    datatype: String,
    shape: Vec<usize>,
    wire: String,
    #[serde(default)]
    nbytes: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
struct InferHeader {
    inputs: Vec<WireTensor>,
}

#[derive(Deserialize)]
struct OutputHeader {
    outputs: Vec<WireTensor>,
}

#[derive(Debug, Deserialize, PartialEq)]
pub struct ReadyInfo {
    pub pid: u32,
    pub numpy: bool,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// A message from a worker.
#[derive(Debug, PartialEq)]
pub enum FromWorker {
    Ready(ReadyInfo),
    LoadFailed(String),
    Outputs(Vec<Tensor>),
    Raised(String),
}

/// Encodes an infer message (without the outer length prefix).
pub fn encode_infer(inputs: &[Tensor]) -> Vec<u8> {
    let mut blob_len = 0;
    let header = InferHeader {
        inputs: inputs
            .iter()
            .map(|t| {
                let (nbytes, data) = match &t.data {
                    Data::Raw(b) => (b.len(), None),
                    Data::Strings(s) => (0, Some(s.clone())),
                };
                blob_len += nbytes;
                WireTensor {
                    name: t.name.clone(),
                    datatype: t.datatype.as_str().to_string(),
                    shape: t.shape.clone(),
                    wire: t.datatype.wire().code().to_string(),
                    nbytes,
                    data,
                }
            })
            .collect(),
    };
    let header = serde_json::to_vec(&header).expect("headers serialize");
    let mut msg = Vec::with_capacity(1 + 4 + header.len() + blob_len);
    msg.push(b'I');
    msg.extend_from_slice(&(header.len() as u32).to_le_bytes());
    msg.extend_from_slice(&header);
    for t in inputs {
        if let Data::Raw(b) = &t.data {
            msg.extend_from_slice(b);
        }
    }
    msg
}

/// Decodes a worker message. Errors mean the worker broke the protocol.
pub fn decode(msg: &[u8]) -> Result<FromWorker, String> {
    let (&kind, body) = msg.split_first().ok_or("empty message")?;
    let json_err = |e: serde_json::Error| format!("bad {} message: {e}", kind as char);
    match kind {
        b'R' => Ok(FromWorker::Ready(
            serde_json::from_slice(body).map_err(json_err)?,
        )),
        b'E' => Ok(FromWorker::LoadFailed(
            serde_json::from_slice::<ErrorBody>(body)
                .map_err(json_err)?
                .error,
        )),
        b'X' => Ok(FromWorker::Raised(
            serde_json::from_slice::<ErrorBody>(body)
                .map_err(json_err)?
                .error,
        )),
        b'O' => {
            let (len, rest) = body.split_at_checked(4).ok_or("truncated O message")?;
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            let (header, mut blob) = rest.split_at_checked(len).ok_or("truncated O header")?;
            let header: OutputHeader = serde_json::from_slice(header).map_err(json_err)?;
            let mut outputs = Vec::with_capacity(header.outputs.len());
            for w in header.outputs {
                let datatype = DataType::parse(&w.datatype).ok_or_else(|| {
                    format!("output {:?}: unknown datatype {:?}", w.name, w.datatype)
                })?;
                let wire = Wire::from_code(&w.wire)
                    .filter(|&wire| wire == datatype.wire())
                    .ok_or_else(|| {
                        format!(
                            "output {:?}: wire {:?} does not fit {}",
                            w.name, w.wire, w.datatype
                        )
                    })?;
                let count = element_count(&w.shape)
                    .ok_or_else(|| format!("output {:?}: shape too large", w.name))?;
                let data = if wire == Wire::Str {
                    let s = w
                        .data
                        .ok_or_else(|| format!("output {:?}: no data", w.name))?;
                    if s.len() != count {
                        return Err(format!(
                            "output {:?}: {} strings for shape {:?}",
                            w.name,
                            s.len(),
                            w.shape
                        ));
                    }
                    Data::Strings(s)
                } else {
                    if w.nbytes != count * wire.size() {
                        return Err(format!(
                            "output {:?}: {} bytes for shape {:?} of {}",
                            w.name, w.nbytes, w.shape, w.datatype
                        ));
                    }
                    let (bytes, rest) = blob
                        .split_at_checked(w.nbytes)
                        .ok_or_else(|| format!("output {:?}: blob too short", w.name))?;
                    blob = rest;
                    Data::Raw(bytes.to_vec())
                };
                outputs.push(Tensor {
                    name: w.name,
                    datatype,
                    shape: w.shape,
                    data,
                });
            }
            Ok(FromWorker::Outputs(outputs))
        }
        other => Err(format!("unknown message kind {other}")),
    }
}

pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, msg: &[u8]) -> std::io::Result<()> {
    w.write_all(&(msg.len() as u32).to_le_bytes()).await?;
    w.write_all(msg).await?;
    w.flush().await
}

pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn infer_message_layout() {
        let inputs = vec![
            Tensor::from_v2("x", "FP32", &[1, 2], &json!([1, 2])).unwrap(),
            Tensor::from_v2("s", "BYTES", &[1], &json!(["hi"])).unwrap(),
        ];
        let msg = encode_infer(&inputs);
        assert_eq!(msg[0], b'I');
        let hlen = u32::from_le_bytes(msg[1..5].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&msg[5..5 + hlen]).unwrap();
        assert_eq!(
            header,
            json!({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 2], "wire": "f4", "nbytes": 8},
                {"name": "s", "datatype": "BYTES", "shape": [1], "wire": "str", "nbytes": 0, "data": ["hi"]},
            ]})
        );
        let blob = &msg[5 + hlen..];
        assert_eq!(blob, [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat());
    }

    fn outputs_msg(header: serde_json::Value, blob: &[u8]) -> Vec<u8> {
        let header = serde_json::to_vec(&header).unwrap();
        let mut msg = vec![b'O'];
        msg.extend_from_slice(&(header.len() as u32).to_le_bytes());
        msg.extend_from_slice(&header);
        msg.extend_from_slice(blob);
        msg
    }

    #[test]
    fn decodes_outputs_and_rejects_inconsistent_ones() {
        let blob = [3i64.to_le_bytes(), 4i64.to_le_bytes()].concat();
        let ok = outputs_msg(
            json!({"outputs": [
                {"name": "y", "datatype": "INT64", "shape": [2], "wire": "i8", "nbytes": 16},
                {"name": "l", "datatype": "BYTES", "shape": [1], "wire": "str", "data": ["a"]},
            ]}),
            &blob,
        );
        let FromWorker::Outputs(out) = decode(&ok).unwrap() else {
            panic!("outputs")
        };
        assert_eq!(serde_json::to_value(out[0].flat()).unwrap(), json!([3, 4]));
        assert_eq!(serde_json::to_value(out[1].flat()).unwrap(), json!(["a"]));

        let bad = [
            json!({"outputs": [{"name": "y", "datatype": "INT64", "shape": [3], "wire": "i8", "nbytes": 16}]}),
            json!({"outputs": [{"name": "y", "datatype": "INT64", "shape": [2], "wire": "f8", "nbytes": 16}]}),
            json!({"outputs": [{"name": "y", "datatype": "INT64", "shape": [4], "wire": "i8", "nbytes": 32}]}),
            json!({"outputs": [{"name": "y", "datatype": "BYTES", "shape": [2], "wire": "str", "data": ["a"]}]}),
        ];
        for header in bad {
            assert!(
                decode(&outputs_msg(header.clone(), &blob)).is_err(),
                "{header}"
            );
        }
    }

    #[test]
    fn decodes_control_messages() {
        assert_eq!(
            decode(b"R{\"pid\": 7, \"numpy\": true}").unwrap(),
            FromWorker::Ready(ReadyInfo {
                pid: 7,
                numpy: true
            })
        );
        assert_eq!(
            decode(b"X{\"error\": \"ValueError: boom\"}").unwrap(),
            FromWorker::Raised("ValueError: boom".into())
        );
        assert!(decode(b"Z").is_err());
        assert!(decode(b"").is_err());
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.unwrap();
        assert_eq!(buf.len(), 9);
        let frame = read_frame(&mut buf.as_slice()).await.unwrap();
        assert_eq!(frame, b"hello");
        assert!(read_frame(&mut &buf[..6]).await.is_err(), "truncated frame");
    }
}
