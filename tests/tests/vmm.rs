//! Virtual memory management for applications and the JIT linker, end to
//! end on the emulated device with sessions in worker processes: the client
//! API's rules, aliasing seen by copies and by a kernel, and every bad
//! request from a raw client answered with an error while the session goes
//! on working.

use bytes::Bytes;
use gpupool_client::alloc::{ACCESS_READ, ACCESS_READWRITE};
use gpupool_client::{ClientError, JitInput, JitLinkRequest, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::v1::{self, call::Op, call_result::Value};
use gpupool_proto::{BUILTIN_MODULE, cuda};
use gpupool_tests::{TestServer, isolated_config};

fn start() -> TestServer {
    TestServer::start(isolated_config().expect("worker binary")).expect("server starts")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reserve_create_map_twice_access_copy_unmap_release() {
    let srv = start();
    let cfg = srv.client_config();
    tokio::task::spawn_blocking(move || {
        let s = Session::connect(&cfg).expect("session");
        let g = s.granularity();
        let (free0, _) = s.mem_get_info();

        let r = s.address_reserve(4 * g, 0, 0).expect("reserve");
        let alias = s.address_reserve(g, 0, 0).expect("reserve the alias");
        let a = s.mem_create(g).expect("create a");
        let b = s.mem_create(g).expect("create b");
        assert_eq!(s.mem_get_info().0, free0 - 2 * g, "physical memory counts at creation");
        s.mem_map(r, g, 0, a).expect("map a");
        s.mem_map(r + g, g, 0, b).expect("map b after it");
        s.mem_map(alias, g, 0, a).expect("map a again");
        let early = s.memcpy_htod(r, &[1; 8], StreamId::DEFAULT).expect_err("no access yet");
        assert_eq!(early.code(), cuda::INVALID_VALUE);
        s.mem_set_access(r, 2 * g, ACCESS_READWRITE).expect("access over both");
        s.mem_set_access(alias, g, ACCESS_READ).expect("read-only alias");

        // A copy across the seam, read back whole, and through the alias.
        let data: Vec<u8> = (0..(2 * g) as usize).map(|i| (i * 7 % 251) as u8).collect();
        s.memcpy_htod(r, &data, StreamId::DEFAULT).expect("copy over both");
        let mut back = vec![0u8; data.len()];
        s.memcpy_dtoh(&mut back, r, StreamId::DEFAULT).expect("read back");
        assert!(back == data, "two allocations, one buffer");
        let mut seen = vec![0u8; 4096];
        s.memcpy_dtoh(&mut seen, alias + 8192, StreamId::DEFAULT).expect("read the alias");
        assert_eq!(seen, data[8192..8192 + 4096], "aliasing");

        // A kernel writes through one address; the alias sees it.
        let m = s.module_load(BUILTIN_MODULE).expect("module");
        let add = m.function("vector_add").expect("vector_add");
        let x = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        s.memcpy_htod(r + 64, &x, StreamId::DEFAULT).expect("inputs");
        let args = [KernelArg::Ptr(r + 64), KernelArg::Ptr(r + 64), KernelArg::Ptr(r), KernelArg::U32(4)];
        s.launch(&add, LaunchConfig::for_elements(4, 32), StreamId::DEFAULT, &args).expect("launch");
        let mut out = vec![0u8; 16];
        s.memcpy_dtoh(&mut out, alias, StreamId::DEFAULT).expect("through the alias");
        assert_eq!(out, f32_bytes(&[2.0, 4.0, 6.0, 8.0]), "the kernel's writes seen through the alias");
        // The read-only alias refuses writes (at the server, at the next sync).
        s.memcpy_htod(alias, &[0; 8], StreamId::DEFAULT).expect("queued");
        assert_eq!(s.synchronize().expect_err("read-only").code(), cuda::INVALID_VALUE);

        // Growth in place, then release while mapped and unmap at the end.
        let c = s.mem_create(g).expect("create c");
        s.mem_map(r + 2 * g, g, 0, c).expect("grow");
        s.mem_set_access(r + 2 * g, g, ACCESS_READWRITE).expect("access");
        s.memcpy_htod(r + 2 * g - 4, &[9; 8], StreamId::DEFAULT).expect("across the new seam");
        s.mem_release(a).expect("release a");
        s.mem_release(b).expect("release b");
        s.mem_release(c).expect("release c");
        let mut still = [0u8; 16];
        s.memcpy_dtoh(&mut still, alias, StreamId::DEFAULT).expect("a is still mapped");
        assert_eq!(still.to_vec(), f32_bytes(&[2.0, 4.0, 6.0, 8.0]));
        s.mem_unmap(r, 3 * g).expect("unmap the buffer");
        s.mem_unmap(alias, g).expect("unmap the alias");
        s.address_free(alias, g).expect("free the alias range");
        s.address_free(r, 4 * g).expect("free the range");
        s.synchronize().expect("all ran");
        assert_eq!(s.mem_get_info().0, free0, "everything released");
        let info = match s.raw_call(Op::MemGetInfo(v1::MemGetInfo {})).expect("server's view") {
            Some(Value::MemInfo(i)) => i,
            other => panic!("mem info: {other:?}"),
        };
        assert_eq!(info.free, free0, "the server agrees");
    })
    .await
    .expect("client");
    srv.stop();
}

/// What a raw client gets for one bad call, and proof the session still
/// works afterwards.
fn refused(s: &Session, op: Op) -> u32 {
    let code = match s.raw_call(op) {
        Err(e) => e.code(),
        Ok(v) => panic!("accepted: {v:?}"),
    };
    let mut back = [0u8; 4];
    s.memcpy_dtoh(&mut back, s.welcome().va_base, StreamId::DEFAULT).expect("the session goes on");
    assert_eq!(back, [7; 4]);
    code
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_vmm_requests_from_a_raw_client_get_error_replies() {
    let srv = start();
    let cfg = srv.client_config();
    tokio::task::spawn_blocking(move || {
        let s = Session::connect(&cfg).expect("session");
        let w = s.welcome().clone();
        let (base, g) = (w.va_base, w.granularity);
        // Something to read back after each refusal: a plain allocation.
        let p = s.mem_alloc(4).expect("alloc");
        assert_eq!(p, base);
        s.memcpy_htod(p, &[7; 4], StreamId::DEFAULT).expect("write");

        let create = |handle, size| Op::VmmCreate(v1::VmmCreate { handle, size, compressible: false });
        let map = |addr, size, offset, handle| Op::VmmMap(v1::VmmMap { addr, size, offset, handle });
        // Handles far above what the client core would pick.
        s.raw_call(create(1000, g)).expect("create");
        let top = base + w.va_size;
        let free_at = top - 4 * g;
        assert_eq!(refused(&s, create(1001, g + 1)), cuda::INVALID_VALUE, "size not granular");
        assert_eq!(refused(&s, create(1000, g)), cuda::INVALID_VALUE, "handle in use");
        assert_eq!(refused(&s, create(1002, w.memory_quota + g)), cuda::OUT_OF_MEMORY, "over the quota");
        assert_eq!(refused(&s, map(free_at, g, 0, 4242)), cuda::INVALID_HANDLE, "unknown handle");
        assert_eq!(refused(&s, map(top, g, 0, 1000)), cuda::INVALID_VALUE, "outside the session's range");
        assert_eq!(refused(&s, map(base - g, g, 0, 1000)), cuda::INVALID_VALUE, "below the session's range");
        assert_eq!(refused(&s, map(0x1000_0000, g, 0, 1000)), cuda::INVALID_VALUE, "another address entirely");
        assert_eq!(refused(&s, map(free_at + 4096, g, 0, 1000)), cuda::INVALID_VALUE, "address not granular");
        assert_eq!(refused(&s, map(free_at, g / 2, 0, 1000)), cuda::INVALID_VALUE, "size not granular");
        assert_eq!(refused(&s, map(free_at, g, g, 1000)), cuda::INVALID_VALUE, "past the allocation");
        assert_eq!(refused(&s, map(base, g, 0, 1000)), cuda::INVALID_VALUE, "over the cuMemAlloc slab");
        s.raw_call(map(free_at, g, 0, 1000)).expect("map");
        assert_eq!(refused(&s, map(free_at, g, 0, 1000)), cuda::INVALID_VALUE, "double map");
        let read = Op::MemcpyDtoh(v1::MemcpyDtoH { src: free_at, size: 4, stream: 0, into_region: None });
        assert_eq!(refused(&s, read.clone()), cuda::INVALID_VALUE, "no access set");
        let access = |addr, size, flags| Op::VmmSetAccess(v1::VmmSetAccess { addr, size, flags });
        assert_eq!(refused(&s, access(free_at, g, 2)), cuda::INVALID_VALUE, "unknown flags");
        assert_eq!(refused(&s, access(free_at, 2 * g, 3)), cuda::INVALID_VALUE, "beyond the mapping");
        s.raw_call(access(free_at, g, 3)).expect("access");
        assert!(matches!(s.raw_call(read), Ok(Some(Value::Data(_)))), "readable now");
        let unmap = |addr, size| Op::VmmUnmap(v1::VmmUnmap { addr, size });
        assert_eq!(refused(&s, unmap(free_at + g / 2, g)), cuda::INVALID_VALUE, "cuts the mapping");
        assert_eq!(refused(&s, unmap(free_at + g, g)), cuda::INVALID_VALUE, "nothing there");
        let release = |handle| Op::VmmRelease(v1::VmmRelease { handle });
        assert_eq!(refused(&s, release(4242)), cuda::INVALID_HANDLE, "unknown handle");
        s.raw_call(release(1000)).expect("release");
        assert_eq!(refused(&s, release(1000)), cuda::INVALID_HANDLE, "released twice");
        assert_eq!(refused(&s, map(free_at + g, g, 0, 1000)), cuda::INVALID_HANDLE, "released handle");
        s.raw_call(unmap(free_at, g)).expect("unmap");
        assert_eq!(
            refused(&s, Op::VmmRetain(v1::VmmRetain { handle: 1000 })),
            cuda::INVALID_HANDLE,
            "gone with its last mapping"
        );
    })
    .await
    .expect("client");
    srv.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_emulated_device_cannot_link_and_inputs_are_bounded() {
    let srv = start();
    let cfg = srv.client_config();
    tokio::task::spawn_blocking(move || {
        let s = Session::connect(&cfg).expect("session");
        let ptx = b".version 7.5\n.target sm_75\n.address_size 64\n.visible .func f() { ret; }\n";
        let input = JitInput { kind: 1, name: "a.ptx".into(), data: Bytes::from_static(ptx), options: vec![(7, 4)] };
        let request = JitLinkRequest { inputs: vec![input], info_log_bytes: 1024, ..JitLinkRequest::default() };
        match s.jit_link(request) {
            Err(ClientError::Cuda { code, message }) => {
                assert_eq!(code, cuda::NOT_SUPPORTED);
                assert!(message.contains("JIT linking needs a CUDA device"), "{message}");
            }
            other => panic!("expected NOT_SUPPORTED, got {other:?}"),
        }
        // Bounds are checked before anything is decoded.
        let one = || v1::JitLinkInput {
            r#type: 1,
            name: "x".into(),
            data: Some(v1::jit_link_input::Data::Inline(payload::encode(Bytes::from_static(b"x"), Compression::Off))),
            options: vec![],
        };
        let link = |inputs: Vec<v1::JitLinkInput>, options: Vec<v1::JitOption>| {
            s.raw_call(Op::JitLink(v1::JitLink { options, inputs, info_log_bytes: 0, error_log_bytes: 0 }))
                .expect_err("refused")
                .code()
        };
        assert_eq!(link((0..257).map(|_| one()).collect(), vec![]), cuda::INVALID_VALUE, "too many inputs");
        assert_eq!(
            link(vec![one()], vec![v1::JitOption { option: 3, value: 0xdead }]),
            cuda::INVALID_VALUE,
            "pointer option"
        );
        assert_eq!(link(vec![v1::JitLinkInput { r#type: 9, ..one() }], vec![]), cuda::INVALID_VALUE, "input type");
        let huge = v1::JitLinkInput {
            data: Some(v1::jit_link_input::Data::Staged(v1::StagedRef { transfer_id: 77, size: 1 << 40 })),
            ..one()
        };
        assert_eq!(link(vec![huge], vec![]), cuda::INVALID_VALUE, "declared size over the limit");
        s.synchronize().expect("the session goes on");
    })
    .await
    .expect("client");
    srv.stop();
}
