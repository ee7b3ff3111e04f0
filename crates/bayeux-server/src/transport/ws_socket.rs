//! The server side of a WebSocket (RFC 6455) on a TCP stream, holding no buffer while idle.
//!
//! tokio-tungstenite keeps a read buffer (zero-filled to its capacity), a write buffer and the
//! state of its `Sink` and `Stream` halves for the whole life of a socket: most of what an idle
//! WebSocket cost. Here bytes are read only once the socket is readable, into a buffer that is
//! released as soon as the frames in it are parsed, and a frame is written straight from its
//! body, header and payload in one `sendmsg` (not `writev`, whose way through the file layer
//! costs the kernel more per frame: about 6 % of the server's CPU in a WebSocket fan-out to
//! many clients). Frame headers are parsed and formatted by tungstenite; what RFC 6455 asks of
//! a server (masked client frames, no reserved bits or opcodes, small final control frames,
//! fragments in order, UTF-8 text, valid close codes) is checked here.

use std::future::Future;
use std::io::{Cursor, ErrorKind, IoSlice};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use super::websocket::{CLOSE_INVALID_PAYLOAD, CLOSE_PROTOCOL, CLOSE_TOO_BIG};

/// What a read brings.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A whole text message, valid UTF-8.
    Text(Bytes),
    /// A whole binary message.
    Binary,
    /// A ping: answer it with [`WsSocket::send_pong`].
    Ping(Bytes),
    /// The client closes, with this code (`None`: no code); answer with [`WsSocket::close`].
    Close(Option<u16>),
}

/// Why the socket cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A message larger than the limit.
    TooBig,
    /// A text message (or close reason) that is not UTF-8.
    Utf8,
    /// Anything else against RFC 6455.
    Protocol(&'static str),
}

impl Failure {
    /// The close code that reports it.
    pub(crate) fn close_code(self) -> u16 {
        match self {
            Failure::TooBig => CLOSE_TOO_BIG,
            Failure::Utf8 => CLOSE_INVALID_PAYLOAD,
            Failure::Protocol(_) => CLOSE_PROTOCOL,
        }
    }
}

/// Least room made in the read buffer for one read.
const READ_CHUNK: usize = 4096;
/// Largest payload of a control frame (RFC 6455, 5.5).
const MAX_CONTROL: u64 = 125;

/// A fragmented message being put together.
struct Partial {
    text: bool,
    data: BytesMut,
}

/// A server-side WebSocket.
pub(crate) struct WsSocket {
    stream: TcpStream,
    /// Bytes read and not parsed yet; empty, without memory, between frames.
    buf: BytesMut,
    /// How many bytes of `buf` the frame at its start needs in all (0: not known yet).
    need: usize,
    /// A fragmented message in progress.
    partial: Option<Box<Partial>>,
    /// Largest message (all its fragments), bytes.
    max_message: usize,
    /// End of stream or a read error: nothing more will come.
    eof: bool,
}

impl WsSocket {
    /// A WebSocket on `stream`, whose upgrade was answered; `read` holds what the client sent
    /// right behind its upgrade request.
    pub(crate) fn new(stream: TcpStream, read: BytesMut, max_message: usize) -> WsSocket {
        WsSocket {
            stream,
            buf: if read.is_empty() {
                BytesMut::new()
            } else {
                read
            },
            need: 0,
            partial: None,
            max_message,
            eof: false,
        }
    }

    /// The next message, or `None` once the stream ended (or failed).
    ///
    /// Cancel-safe: what was read stays in the socket's buffer for the next call, and the only
    /// wait is for the socket to be readable, with no memory reserved meanwhile. The future is
    /// one reference: it lives in the task of every idle socket.
    pub(crate) fn next(
        &mut self,
    ) -> impl Future<Output = Option<Result<Incoming, Failure>>> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, Failure>>> {
        loop {
            match self.parse() {
                Ok(Some(incoming)) => return Poll::Ready(Some(Ok(incoming))),
                Err(failure) => return Poll::Ready(Some(Err(failure))),
                Ok(None) => {}
            }
            if self.eof {
                return Poll::Ready(None);
            }
            if ready!(self.stream.poll_read_ready(cx)).is_err() {
                self.eof = true;
                return Poll::Ready(None);
            }
            let want = self.need.saturating_sub(self.buf.len()).max(READ_CHUNK);
            if self.buf.capacity() - self.buf.len() < want {
                self.buf.reserve(want);
            }
            match crate::front::read_ready(&self.stream, &mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.release_if_empty(),
                Err(_) => {
                    self.eof = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn release_if_empty(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// The next whole message in the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Incoming>, Failure> {
        loop {
            let mut cursor = Cursor::new(&self.buf[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => {
                    self.need = 0;
                    return Ok(None);
                }
                Err(_) => return Err(Failure::Protocol("reserved opcode")),
            };
            let head = cursor.position() as usize;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(Failure::Protocol("reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(Failure::Protocol("client frame not masked"));
            };
            match header.opcode {
                OpCode::Control(_) => {
                    if !header.is_final || len > MAX_CONTROL {
                        return Err(Failure::Protocol("fragmented or long control frame"));
                    }
                }
                OpCode::Data(_) => {
                    let so_far = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
                    if so_far.saturating_add(len) > self.max_message as u64 {
                        return Err(Failure::TooBig);
                    }
                }
            }
            // Within the message limit, so this fits in memory.
            let len = len as usize;
            if self.buf.len() < head + len {
                self.need = head + len;
                return Ok(None);
            }
            self.need = 0;
            self.buf.advance(head);
            let mut payload = self.buf.split_to(len);
            self.release_if_empty();
            unmask(&mut payload, mask);
            if let Some(incoming) = self.frame(header.opcode, header.is_final, payload)? {
                return Ok(Some(incoming));
            }
        }
    }

    /// Takes one unmasked frame; a message when it completes one.
    fn frame(
        &mut self,
        opcode: OpCode,
        is_final: bool,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, Failure> {
        let (text, data) = match opcode {
            OpCode::Control(Control::Close) => return close_frame(&payload).map(Some),
            OpCode::Control(Control::Ping) => return Ok(Some(Incoming::Ping(payload.freeze()))),
            OpCode::Control(_) => return Ok(None),
            OpCode::Data(Data::Continue) => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(Failure::Protocol("continuation without a message"));
                };
                partial.data.extend_from_slice(&payload);
                if !is_final {
                    return Ok(None);
                }
                let partial = self.partial.take().expect("checked above");
                (partial.text, partial.data)
            }
            OpCode::Data(kind) => {
                if self.partial.is_some() {
                    return Err(Failure::Protocol("new message before the last one ended"));
                }
                let text = kind == Data::Text;
                if !is_final {
                    self.partial = Some(Box::new(Partial {
                        text,
                        data: payload,
                    }));
                    return Ok(None);
                }
                (text, payload)
            }
        };
        if !text {
            return Ok(Some(Incoming::Binary));
        }
        if std::str::from_utf8(&data).is_err() {
            return Err(Failure::Utf8);
        }
        Ok(Some(Incoming::Text(data.freeze())))
    }

    /// Sends one text message (`body` must be UTF-8) in one frame.
    pub(crate) fn send_text<'a>(
        &'a mut self,
        body: &'a [u8],
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        debug_assert!(std::str::from_utf8(body).is_ok());
        self.send(OpCode::Data(Data::Text), body)
    }

    /// Answers a ping.
    pub(crate) fn send_pong<'a>(
        &'a mut self,
        payload: &'a [u8],
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        self.send(OpCode::Control(Control::Pong), payload)
    }

    /// Writes one frame, header and payload together (one `sendmsg`, usually).
    async fn send(&mut self, opcode: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let mut head = [0u8; 14];
        let mut cursor = Cursor::new(&mut head[..]);
        header
            .format(payload.len() as u64, &mut cursor)
            .map_err(std::io::Error::other)?;
        let head_len = cursor.position() as usize;
        let head = &head[..head_len];
        let total = head.len() + payload.len();
        let mut written = 0;
        let stream = &mut self.stream;
        std::future::poll_fn(|cx| {
            while written < total {
                let slices = if written < head.len() {
                    [IoSlice::new(&head[written..]), IoSlice::new(payload)]
                } else {
                    [
                        IoSlice::new(&payload[written - head.len()..]),
                        IoSlice::new(&[]),
                    ]
                };
                ready!(stream.poll_write_ready(cx))?;
                let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                    socket2::SockRef::from(&*stream).send_vectored(&slices)
                });
                match sent {
                    Ok(0) => return Poll::Ready(Err(ErrorKind::WriteZero.into())),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Sends a close frame (`code` `None`: an empty one, the answer to an empty close) and
    /// closes the connection: the write side first, then, once the client closed its side or
    /// after a short while, the whole socket. Bytes that still arrive are read and dropped:
    /// closing a socket with unread data resets it, and the client could lose the close frame.
    pub(crate) async fn close(mut self, code: Option<u16>, reason: &str) {
        let mut payload = Vec::with_capacity(2 + reason.len());
        if let Some(code) = code {
            payload.extend_from_slice(&code.to_be_bytes());
            let mut end = reason.len().min(MAX_CONTROL as usize - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..end]);
        }
        if self
            .send(OpCode::Control(Control::Close), &payload)
            .await
            .is_ok()
        {
            crate::front::close(self.stream, !self.eof).await;
        }
    }
}

/// A client's close frame: its code, checked.
fn close_frame(payload: &[u8]) -> Result<Incoming, Failure> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(Failure::Protocol("close frame of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !CloseCode::from(code).is_allowed() {
                return Err(Failure::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Failure::Utf8);
            }
            Ok(Incoming::Close(Some(code)))
        }
    }
}

/// Unmasks a client frame's payload in place.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// A socket whose buffer holds `bytes` (its stream is a real, idle connection).
    async fn socket_with(bytes: &[u8], max: usize) -> (WsSocket, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (WsSocket::new(server, BytesMut::from(bytes), max), client)
    }

    #[test]
    fn unmask_matches_the_bytewise_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut data = original.clone();
            unmask(&mut data, mask);
            let expected: Vec<u8> = original
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(data, expected, "length {len}");
        }
    }

    #[tokio::test]
    async fn frames_become_messages_and_the_buffer_is_released() {
        let mut bytes = masked(0x81, b"[1]", [1, 2, 3, 4]);
        bytes.extend(masked(0x01, b"[\"a", [9, 8, 7, 6]));
        bytes.extend(masked(0x89, b"hi", [5, 5, 5, 5])); // a ping between fragments
        bytes.extend(masked(0x80, b"b\"]", [0, 1, 0, 1]));
        bytes.extend(masked(0x82, b"\x00\x01", [3, 3, 3, 3]));
        bytes.extend(masked(0x88, &1000u16.to_be_bytes(), [7, 7, 7, 7]));
        let (mut ws, _client) = socket_with(&bytes, 1024).await;
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(format!("{:?}", ws.next().await.unwrap().unwrap()));
        }
        assert_eq!(
            got,
            [
                "Text(b\"[1]\")",
                "Ping(b\"hi\")",
                "Text(b\"[\\\"ab\\\"]\")",
                "Binary",
                "Close(Some(1000))"
            ]
        );
        assert_eq!(ws.buf.capacity(), 0, "nothing kept between frames");
    }

    #[tokio::test]
    async fn broken_frames_are_refused() {
        let cases: Vec<(Vec<u8>, Failure)> = vec![
            (
                vec![0x81, 0x01, b'x'],
                Failure::Protocol("client frame not masked"),
            ),
            (
                masked(0xc1, b"x", [1, 1, 1, 1]),
                Failure::Protocol("reserved bits set"),
            ),
            (
                masked(0x83, b"x", [1, 1, 1, 1]),
                Failure::Protocol("reserved opcode"),
            ),
            (
                masked(0x09, b"x", [1, 1, 1, 1]),
                Failure::Protocol("fragmented or long control frame"),
            ),
            (
                masked(0x89, &[0; 126], [1, 1, 1, 1]),
                Failure::Protocol("fragmented or long control frame"),
            ),
            (
                masked(0x80, b"x", [1, 1, 1, 1]),
                Failure::Protocol("continuation without a message"),
            ),
            (
                [masked(0x01, b"x", [1; 4]), masked(0x81, b"y", [1; 4])].concat(),
                Failure::Protocol("new message before the last one ended"),
            ),
            (masked(0x81, b"\xff", [1, 1, 1, 1]), Failure::Utf8),
            (masked(0x81, &[b' '; 33], [1, 1, 1, 1]), Failure::TooBig),
            (
                [
                    masked(0x01, &[b' '; 20], [1; 4]),
                    masked(0x80, &[b' '; 13], [1; 4]),
                ]
                .concat(),
                Failure::TooBig,
            ),
            (
                masked(0x88, &[3], [1, 1, 1, 1]),
                Failure::Protocol("close frame of one byte"),
            ),
            (
                masked(0x88, &1005u16.to_be_bytes(), [1, 1, 1, 1]),
                Failure::Protocol("invalid close code"),
            ),
        ];
        for (bytes, expected) in cases {
            let (mut ws, _client) = socket_with(&bytes, 32).await;
            assert_eq!(ws.next().await.unwrap().unwrap_err(), expected, "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_its_payload_arrives() {
        // Only the header: 2^40 bytes announced.
        let mut bytes = vec![0x81, 0x80 | 127];
        bytes.extend_from_slice(&(1u64 << 40).to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let (mut ws, _client) = socket_with(&bytes, 65536).await;
        assert_eq!(ws.next().await.unwrap().unwrap_err(), Failure::TooBig);
    }

    #[tokio::test]
    async fn a_frame_split_across_reads_is_put_together() {
        use tokio::io::AsyncWriteExt as _;
        let payload = vec![b'7'; 70_000];
        let bytes = masked(0x81, &payload, [4, 3, 2, 1]);
        let (mut ws, mut client) = socket_with(&bytes[..3], 100_000).await;
        let writer = tokio::spawn(async move {
            for piece in bytes[3..].chunks(5000) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        match ws.next().await.unwrap().unwrap() {
            Incoming::Text(t) => assert_eq!(&t[..], &payload[..]),
            other => panic!("{other:?}"),
        }
        let mut client = writer.await.unwrap();
        // End of stream: None, and it stays so.
        client.shutdown().await.unwrap();
        drop(client);
        assert!(ws.next().await.is_none());
        assert!(ws.next().await.is_none());
    }

    #[tokio::test]
    async fn frames_sent_have_the_right_headers() {
        use tokio::io::AsyncReadExt as _;
        let (mut ws, mut client) = socket_with(b"", 1024).await;
        ws.send_text(b"[]").await.unwrap();
        let long = vec![b'x'; 300];
        ws.send_text(&long).await.unwrap();
        ws.send_pong(b"p").await.unwrap();
        let closing = tokio::spawn(ws.close(Some(1001), "bye"));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        drop(client);
        closing.await.unwrap();
        let mut expected = vec![0x81, 2, b'[', b']', 0x81, 126, 1, 44];
        expected.extend_from_slice(&long);
        expected.extend_from_slice(&[0x8a, 1, b'p', 0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']);
        assert_eq!(got, expected);
    }
}
