//! Fuzz targets for what a gpu-server decodes from another process or a
//! client beyond the messages themselves (`docs/fuzzing.md`; the messages
//! are fuzzed in `proto/tests/fuzz.rs`): the supervisor-worker pipe
//! (framed `WorkerSpec` and `WorkerAssign`, and the configuration a worker
//! takes from its spec), and a session's execution of arbitrary batches on
//! the emulated device. Bounded case counts; `GPUPOOL_FUZZ_CASES` runs
//! longer.

use crate::device::emulated::{EmulatedDevice, GRANULARITY};
use crate::device::{Backend, BackendSession, builtin};
use crate::images::{ImageCache, key_of};
use crate::session::{SessionLimits, SessionState};
use crate::staging::Staging;
use crate::worker::read_message;
use crate::worker_spec::config_from_spec;
use bytes::Bytes;
use gpupool_proto::fuzz::{config, mutate, mutations};
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::v1::{self, call::Op};
use proptest::prelude::*;
use prost::Message;
use std::sync::Arc;

/// The session's range starts here (the emulated device's first session).
fn va_base() -> u64 {
    EmulatedDevice::new(1 << 30).open_session(16 * GRANULARITY).expect("session").va_base()
}

/// Numbers that find edges: zero, one, the range's start and its
/// granules, the end of the address space, powers of two around 2^31.
fn number() -> impl Strategy<Value = u64> {
    let base = va_base();
    prop_oneof![
        Just(0u64),
        Just(1),
        (0u64..16).prop_map(move |k| base + k * GRANULARITY),
        (0u64..16 * GRANULARITY).prop_map(move |o| base + o),
        (0u64..8).prop_map(|k| k * GRANULARITY),
        Just(u64::MAX),
        (28u32..64).prop_map(|s| 1u64 << s),
        any::<u64>(),
    ]
}

fn small() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..4, Just(u32::MAX), Just(1 << 31), Just(1024), any::<u32>()]
}

fn dim3() -> impl Strategy<Value = Option<v1::Dim3>> {
    proptest::option::of((small(), small(), small()).prop_map(|(x, y, z)| v1::Dim3 { x, y, z }))
}

fn data() -> impl Strategy<Value = v1::Payload> {
    (proptest::collection::vec(any::<u8>(), 0..256), any::<bool>()).prop_map(|(d, lz4)| {
        let mode = if lz4 { Compression::Auto } else { Compression::Off };
        payload::encode(Bytes::from(d), mode)
    })
}

/// One call of any kind the emulated device runs, its numbers at edges.
fn op() -> impl Strategy<Value = Op> {
    let builtin = Bytes::copy_from_slice(&key_of(gpupool_proto::BUILTIN_MODULE));
    let functions = builtin::functions().len() as u32;
    let params = proptest::collection::vec(number(), 0..8)
        .prop_map(|words| Bytes::from(words.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>()));
    prop_oneof![
        (number(), number()).prop_map(|(addr, size)| Op::MemMap(v1::MemMap { addr, size })),
        number().prop_map(|addr| Op::MemUnmap(v1::MemUnmap { addr })),
        (number(), small(), data(), any::<bool>()).prop_map(|(dst, stream, p, asynchronous)| {
            Op::MemcpyHtod(v1::MemcpyHtoD {
                dst,
                stream,
                source: Some(v1::memcpy_hto_d::Source::Inline(p)),
                asynchronous,
            })
        }),
        (number(), number(), number()).prop_map(|(dst, transfer_id, size)| Op::MemcpyHtod(v1::MemcpyHtoD {
            dst,
            stream: 0,
            source: Some(v1::memcpy_hto_d::Source::Staged(v1::StagedRef { transfer_id, size })),
            asynchronous: false,
        })),
        (number(), number(), small()).prop_map(|(src, size, stream)| Op::MemcpyDtoh(v1::MemcpyDtoH {
            src,
            size,
            stream,
            into_region: None,
        })),
        (number(), small(), small(), number(), number()).prop_map(|(src, stream, region, offset, size)| {
            Op::MemcpyDtoh(v1::MemcpyDtoH {
                src,
                size,
                stream,
                into_region: Some(v1::HostRegionRef { region, offset, size }),
            })
        }),
        (number(), small(), number(), number()).prop_map(|(dst, region, offset, size)| {
            Op::MemcpyHtod(v1::MemcpyHtoD {
                dst,
                stream: 0,
                source: Some(v1::memcpy_hto_d::Source::Region(v1::HostRegionRef { region, offset, size })),
                asynchronous: true,
            })
        }),
        (number(), number(), number()).prop_map(|(dst, src, size)| Op::MemcpyDtod(v1::MemcpyDtoD {
            dst,
            src,
            size,
            stream: 0
        })),
        (number(), small(), small(), number()).prop_map(|(dst, value, element_size, count)| Op::Memset(v1::Memset {
            dst,
            value,
            element_size,
            count,
            stream: 0
        })),
        (small(), proptest::option::of(data()), any::<bool>()).prop_map(move |(module, image, known)| {
            let sha256 = if known {
                builtin.clone()
            } else {
                image.as_ref().map(|p| Bytes::copy_from_slice(&key_of(&p.data))).unwrap_or_default()
            };
            Op::ModuleLoad(v1::ModuleLoad { module, sha256, image, staged: None })
        }),
        small().prop_map(|module| Op::ModuleUnload(v1::ModuleUnload { module })),
        (0u32..3, 0..functions + 1, dim3(), dim3(), small(), params).prop_map(
            |(module, function, grid, block, shared_mem_bytes, params)| Op::Launch(v1::Launch {
                module,
                function,
                grid,
                block,
                shared_mem_bytes,
                stream: 0,
                params,
                attributes: None,
            })
        ),
        (small(), small()).prop_map(|(stream, flags)| Op::StreamCreate(v1::StreamCreate {
            stream,
            flags,
            priority: 0
        })),
        small().prop_map(|stream| Op::StreamDestroy(v1::StreamDestroy { stream })),
        small().prop_map(|stream| Op::StreamSynchronize(v1::StreamSynchronize { stream })),
        (small(), proptest::collection::vec((0u32..8, number(), number(), small()), 0..4)).prop_map(|(stream, ops)| {
            let ops =
                ops.into_iter().map(|(kind, address, value, flags)| v1::StreamMemOp { kind, address, value, flags });
            Op::StreamMemOps(v1::StreamMemOps { stream, ops: ops.collect() })
        }),
        small().prop_map(|event| Op::EventCreate(v1::EventCreate { event, flags: 0 })),
        (small(), small()).prop_map(|(event, stream)| Op::EventRecord(v1::EventRecord { event, stream })),
        (small(), small()).prop_map(|(start, end)| Op::EventElapsed(v1::EventElapsed { start, end })),
        Just(Op::ContextSynchronize(v1::ContextSynchronize {})),
        Just(Op::MemGetInfo(v1::MemGetInfo {})),
        (0u32..3, 0..functions + 1, 0i32..5, small(), number(), dim3(), dim3(), dim3()).prop_map(
            |(module, function, query, block_size, dynamic_smem_bytes, grid, block, cluster)| Op::Occupancy(
                v1::Occupancy {
                    module,
                    function,
                    query,
                    block_size,
                    dynamic_smem_bytes,
                    flags: 0,
                    num_blocks: block_size,
                    grid,
                    block,
                    cluster,
                }
            )
        ),
        (0u32..3, 0..functions + 1, small(), any::<i32>()).prop_map(|(module, function, attribute, value)| {
            Op::FuncSetAttribute(v1::FuncSetAttribute { module, function, attribute, value })
        }),
        (0u32..3, prop_oneof![0..functions + 1, Just(u32::MAX)])
            .prop_map(|(module, function)| Op::DescribeFunction(v1::DescribeFunction { module, function })),
        (small(), number(), any::<bool>()).prop_map(|(handle, size, compressible)| Op::VmmCreate(v1::VmmCreate {
            handle,
            size,
            compressible
        })),
        (number(), number(), number(), small()).prop_map(|(addr, size, offset, handle)| Op::VmmMap(v1::VmmMap {
            addr,
            size,
            offset,
            handle
        })),
        (number(), number(), small()).prop_map(|(addr, size, flags)| Op::VmmSetAccess(v1::VmmSetAccess {
            addr,
            size,
            flags
        })),
        (number(), number()).prop_map(|(addr, size)| Op::VmmUnmap(v1::VmmUnmap { addr, size })),
        small().prop_map(|handle| Op::VmmRelease(v1::VmmRelease { handle })),
        (small(), number()).prop_map(|(limit, value)| Op::CtxSetLimit(v1::CtxSetLimit { limit, value })),
        (number(), number()).prop_map(|(addr, size)| Op::MirrorAdd(v1::MirrorAdd { addr, size })),
        number().prop_map(|addr| Op::MirrorRemove(v1::MirrorRemove { addr })),
        ((small(), number(), number(), number()), (small(), small(), small(), small())).prop_map(
            |((array, width, height, depth), (format, channels, flags, levels))| {
                Op::ArrayCreate(v1::ArrayCreate { array, width, height, depth, format, channels, flags, levels })
            }
        ),
        (small(), small(), small()).prop_map(|(array, mipmapped, level)| Op::ArrayLevel(v1::ArrayLevel {
            array,
            mipmapped,
            level
        })),
        small().prop_map(|array| Op::ArrayDestroy(v1::ArrayDestroy { array })),
        (small(), small())
            .prop_map(|(stream, attribute)| Op::StreamGetAttribute(v1::StreamGetAttribute { stream, attribute })),
        (small(), small(), data()).prop_map(|(stream, attribute, p)| Op::StreamSetAttribute(v1::StreamSetAttribute {
            stream,
            attribute,
            value: p.data
        })),
        (copy_place(), copy_place(), (number(), number(), number()), proptest::option::of(data())).prop_map(
            |(dst, src, (width, height, depth), bytes)| Op::ArrayCopy(v1::ArrayCopy {
                stream: 0,
                dst: Some(dst),
                src: Some(src),
                width,
                height,
                depth,
                source: bytes.map(v1::array_copy::Source::Inline),
            })
        ),
        (small(), number(), number(), small()).prop_map(|(array, addr, size, kind)| {
            use v1::texture_resource::Kind;
            let kind = match kind % 3 {
                0 => Kind::Array(array),
                1 => Kind::Mipmapped(array),
                _ => Kind::Linear(v1::LinearResource { addr, format: 0x20, channels: 1, size }),
            };
            Op::TexObjectCreate(v1::TexObjectCreate {
                resource: Some(v1::TextureResource { kind: Some(kind), flags: 0 }),
                texture: Some(v1::TextureDesc {
                    address_mode: vec![0; 3],
                    border_color: vec![0.0; 4],
                    ..Default::default()
                }),
                view: None,
            })
        }),
        number().prop_map(|object| Op::TexObjectDestroy(v1::TexObjectDestroy { object })),
        small().prop_map(|array| Op::SurfObjectCreate(v1::SurfObjectCreate { array })),
        number().prop_map(|object| Op::SurfObjectDestroy(v1::SurfObjectDestroy { object })),
        (small(), number(), proptest::collection::vec(number(), 0..6), proptest::collection::vec(small(), 0..6))
            .prop_map(|(rank, global_address, dims, boxes)| Op::TensorMapEncode(v1::TensorMapEncode {
                rank,
                global_address,
                global_dim: dims.clone(),
                global_strides: dims,
                box_dim: boxes.clone(),
                element_strides: boxes,
                ..Default::default()
            })),
        (proptest::collection::vec((small(), number()), 0..3), proptest::collection::vec(data(), 0..3)).prop_map(
            |(options, inputs)| Op::JitLink(v1::JitLink {
                options: options.into_iter().map(|(option, value)| v1::JitOption { option, value }).collect(),
                inputs: inputs
                    .into_iter()
                    .map(|p| v1::JitLinkInput {
                        r#type: 1,
                        name: "x".into(),
                        data: Some(v1::jit_link_input::Data::Inline(p)),
                        options: vec![],
                    })
                    .collect(),
                info_log_bytes: 64,
                error_log_bytes: 1 << 30,
            })
        ),
    ]
}

/// One end of an array copy.
fn copy_place() -> impl Strategy<Value = v1::CopyPlace> {
    use v1::copy_place::Place;
    prop_oneof![
        (small(), number(), number(), number()).prop_map(|(array, x, y, z)| Place::Array(v1::ArrayPlace {
            array,
            x,
            y,
            z
        })),
        (number(), number(), number()).prop_map(|(addr, pitch, height)| Place::Device(v1::DevicePlace {
            addr,
            pitch,
            height
        })),
        Just(Place::Host(v1::HostPlace {})),
    ]
    .prop_map(|place| v1::CopyPlace { place: Some(place) })
}

fn limits() -> SessionLimits {
    SessionLimits { max_handles: 8, max_listed_errors: 4, ..crate::session::tests::limits() }
}

proptest! {
    #![proptest_config(config(64))]

    /// Batches of any calls on the emulated device: every call answers
    /// with a value or an error, the session stays within its quota, and
    /// nothing panics (issue 20, finding 8 was such a panic).
    #[test]
    fn session_executes_any_batch(batches in proptest::collection::vec(proptest::collection::vec(op(), 1..24), 1..4)) {
        let dev = EmulatedDevice::new(1 << 30);
        let mut s = SessionState::new(
            dev.open_session(limits().va_size).expect("session"),
            limits(),
            Arc::new(Staging::new(1 << 24, 8)),
            Arc::new(ImageCache::new(None, 1 << 20)),
        );
        for (i, ops) in batches.into_iter().enumerate() {
            let n = ops.len();
            let reply = s.execute_batch(v1::Batch { seq: i as u64 + 1, calls: ops.into_iter().map(|op| v1::Call { op: Some(op) }).collect() });
            prop_assert_eq!(reply.seq, i as u64 + 1);
            prop_assert!(reply.error_count as usize <= n);
            prop_assert!(reply.errors.len() <= limits().max_listed_errors + 1);
            prop_assert!(s.mapped_bytes() <= limits().memory_quota);
        }
    }

    /// The worker's stdin: any bytes, and valid frames with edits, read as
    /// a `WorkerSpec` then `WorkerAssign`s; a spec that decodes becomes a
    /// configuration or a clear error.
    #[test]
    fn worker_pipe(raw in proptest::collection::vec(any::<u8>(), 0..512), edits in mutations(), which in 0u8..3) {
        let spec = v1::WorkerSpec {
            device: "emulated:1073741824".into(),
            listen_ip: "127.0.0.1".into(),
            memory_quota: 1 << 30,
            max_frame_bytes: 16 << 20,
            max_inline_bytes: 1 << 20,
            max_handles: 64,
            max_bulk_streams: 4,
            batch_queue: 8,
            max_queued_batch_bytes: 1 << 20,
            max_udp_payload: 1452,
            port_low: 40000,
            port_high: 40100,
            ..Default::default()
        };
        let assign = v1::WorkerAssign { ticket: "t".into(), subject: "s".into(), memory_quota: 1, session_id: 2, resume_secret: "r".into(), ..Default::default() };
        let input = match which {
            0 => raw,
            1 => mutate(gpupool_proto::frame::encode(&spec).to_vec(), &edits),
            _ => [gpupool_proto::frame::encode(&spec).to_vec(), mutate(gpupool_proto::frame::encode(&assign).to_vec(), &edits)].concat(),
        };
        let mut r = std::io::Cursor::new(input);
        if let Ok(Some(spec)) = read_message::<v1::WorkerSpec>(&mut r) {
            let _ = config_from_spec(&spec);
            while let Ok(Some(a)) = read_message::<v1::WorkerAssign>(&mut r) {
                prop_assert!(a.encoded_len() <= 1 << 20);
            }
        }
    }

    /// Specs with any values: a configuration or an error naming it.
    #[test]
    fn worker_spec_values(
        device in prop_oneof![Just("auto".to_string()), Just("emulated:0".to_string()), "[a-z:0-9]{0,24}"],
        listen_ip in prop_oneof![Just("127.0.0.1".to_string()), ".{0,20}"],
        numbers in proptest::collection::vec(any::<u64>(), 15),
    ) {
        let spec = v1::WorkerSpec {
            device,
            listen_ip,
            memory_quota: numbers[0],
            max_inline_bytes: numbers[1] as u32,
            max_frame_bytes: numbers[2] as u32,
            max_staging_bytes: numbers[3],
            max_handles: numbers[4] as u32,
            max_bulk_streams: numbers[5] as u32,
            batch_queue: numbers[6] as u32,
            image_cache_bytes: numbers[7],
            idle_timeout_ms: numbers[8],
            max_udp_payload: numbers[9] as u32,
            handshake_timeout_ms: numbers[10],
            resume_grace_ms: numbers[11],
            port_low: numbers[12] as u32,
            port_high: numbers[13] as u32,
            max_queued_batch_bytes: numbers[14],
            ..Default::default()
        };
        let _ = config_from_spec(&spec);
    }
}
