//! A real SMTP server on loopback for the alert tests: the `mailin` crate
//! speaks the protocol (EHLO, AUTH, MAIL, RCPT, DATA), this file only owns
//! the sockets and keeps what arrives. nightjar's own sender talks to it
//! through lettre exactly as it would to a production relay.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mailin::{Action, AuthMechanism, Handler, Response, SessionBuilder, response};

/// One accepted email.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    /// The raw message as sent (headers and MIME body).
    pub raw: String,
}

impl Received {
    /// The decoded `Subject:`.
    pub fn subject(&self) -> String {
        decode_words(header(&self.raw, "Subject").as_deref().unwrap_or(""))
    }

    /// The decoded body of the MIME part with this content type.
    pub fn part(&self, content_type: &str) -> String {
        // Every MIME part is "headers CRLF CRLF body"; find the part's headers,
        // then take its body up to the next boundary line.
        let raw = &self.raw;
        let Some(at) = raw.find(&format!("Content-Type: {content_type}")) else {
            panic!("no {content_type} part in:\n{raw}");
        };
        let part_headers_end = raw[at..].find("\r\n\r\n").map(|i| at + i + 4).expect("part has a body");
        let part_headers = &raw[at..part_headers_end];
        let body = &raw[part_headers_end..];
        let body = body.split("\r\n--").next().unwrap_or("");
        match header(part_headers, "Content-Transfer-Encoding").as_deref() {
            Some("quoted-printable") => decode_qp(body),
            Some("base64") => String::from_utf8_lossy(&decode_b64(&body.replace("\r\n", ""))).into_owned(),
            _ => body.to_string(),
        }
    }

    pub fn text(&self) -> String {
        self.part("text/plain").replace("\r\n", "\n")
    }

    pub fn html(&self) -> String {
        self.part("text/html").replace("\r\n", "\n")
    }

    /// The value on the plain-text line starting with `label:`.
    pub fn field(&self, label: &str) -> Option<String> {
        self.text().lines().find_map(|l| l.strip_prefix(&format!("{label}:")).map(|v| v.trim().to_string()))
    }
}

fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        match &mut value {
            // Folded continuation lines belong to the header above.
            Some(v) if line.starts_with([' ', '\t']) => v.push_str(line),
            Some(_) => break,
            None => {
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case(name)
                {
                    value = Some(v.trim().to_string());
                }
            }
        }
    }
    value
}

/// RFC 2047 encoded words (`=?utf-8?b?...?=`, `=?utf-8?q?...?=`) to text.
fn decode_words(value: &str) -> String {
    let mut out = Vec::new();
    let mut rest = value;
    let mut after_word = false;
    while !rest.is_empty() {
        if let Some(start) = rest.find("=?") {
            let between = &rest[..start];
            // Whitespace between two encoded words is not part of the text.
            if !(after_word && between.trim().is_empty()) {
                out.extend_from_slice(between.as_bytes());
            }
            let word = &rest[start + 2..];
            let mut pieces = word.splitn(3, '?');
            let (_charset, enc, tail) = (pieces.next().unwrap_or(""), pieces.next().unwrap_or(""), pieces.next());
            let Some(tail) = tail else { break };
            let end = tail.find("?=").unwrap_or(tail.len());
            let text = &tail[..end];
            if enc.eq_ignore_ascii_case("b") {
                out.extend(decode_b64(text));
            } else {
                out.extend(decode_qp(&text.replace('_', " ")).into_bytes());
            }
            rest = &tail[(end + 2).min(tail.len())..];
            after_word = true;
        } else {
            out.extend_from_slice(rest.as_bytes());
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn decode_b64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let Some(v) = ALPHABET.iter().position(|&a| a == c) else { continue };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn decode_qp(s: &str) -> String {
    let bytes = s.replace("=\r\n", "").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'='
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Default)]
struct Shared {
    inbox: Mutex<Vec<Received>>,
    /// (username, password) of every AUTH attempt.
    logins: Mutex<Vec<(String, String)>>,
    /// AUTH attempts still to refuse with 535 before accepting.
    refuse_logins: AtomicU32,
    required_password: Mutex<Option<String>>,
    stop: AtomicBool,
}

#[derive(Clone)]
struct Session {
    shared: Arc<Shared>,
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
}

impl Session {
    fn login(&mut self, user: &str, password: &str) -> Response {
        self.shared.logins.lock().unwrap().push((user.to_string(), password.to_string()));
        let refuse = self.shared.refuse_logins.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        let wrong = self.shared.required_password.lock().unwrap().as_deref() != Some(password);
        if refuse.is_ok() || wrong { response::INVALID_CREDENTIALS } else { response::AUTH_OK }
    }
}

impl Handler for Session {
    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.from = from.to_string();
        self.to = to.to_vec();
        self.data.clear();
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let raw = String::from_utf8_lossy(&self.data).into_owned();
        self.shared.inbox.lock().unwrap().push(Received { from: self.from.clone(), to: self.to.clone(), raw });
        response::OK
    }

    fn auth_plain(&mut self, _authorization_id: &str, authentication_id: &str, password: &str) -> Response {
        self.login(authentication_id, password)
    }

    fn auth_login(&mut self, username: &str, password: &str) -> Response {
        self.login(username, password)
    }
}

/// A running server; it stops when dropped.
pub struct SmtpServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl SmtpServer {
    /// A server that takes mail from anyone.
    pub fn start() -> SmtpServer {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).expect("SMTP server binds")
    }

    /// A server that takes mail only after AUTH with `password`.
    pub fn start_with_password(password: &str) -> SmtpServer {
        let shared = Shared { required_password: Mutex::new(Some(password.to_string())), ..Shared::default() };
        Self::serve(SocketAddr::from(([127, 0, 0, 1], 0)), shared).expect("SMTP server binds")
    }

    /// Binds `addr`, e.g. a port that was closed until now.
    pub fn start_on(addr: SocketAddr) -> std::io::Result<SmtpServer> {
        Self::serve(addr, Shared::default())
    }

    fn serve(addr: SocketAddr, shared: Shared) -> std::io::Result<SmtpServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let mut builder = SessionBuilder::new("smtp.test");
        if shared.required_password.lock().unwrap().is_some() {
            // Loopback only: AUTH without TLS is what lets the tests see the password arrive.
            builder
                .enable_auth(AuthMechanism::Plain)
                .enable_auth(AuthMechanism::Login)
                .insecure_enable_plaintext_auth();
        }
        let shared = Arc::new(shared);
        let accept_shared = shared.clone();
        std::thread::spawn(move || {
            while !accept_shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let builder = builder.clone();
                        let session =
                            Session { shared: accept_shared.clone(), from: String::new(), to: vec![], data: vec![] };
                        std::thread::spawn(move || serve(stream, peer.ip(), &builder, session));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(SmtpServer { addr, shared })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn messages(&self) -> Vec<Received> {
        self.shared.inbox.lock().unwrap().clone()
    }

    pub fn logins(&self) -> Vec<(String, String)> {
        self.shared.logins.lock().unwrap().clone()
    }

    /// Answers the next `n` AUTH attempts with 535.
    pub fn refuse_logins(&self, n: u32) {
        self.shared.refuse_logins.store(n, Ordering::SeqCst);
    }

    /// Waits up to `timeout` for at least `n` messages.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream, peer: IpAddr, builder: &SessionBuilder, handler: Session) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut session = builder.build(peer, handler);
    if session.greeting().write_to(&mut writer).is_err() {
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let res = session.process(&line);
        match res.action {
            Action::Reply => {
                if res.write_to(&mut writer).is_err() {
                    return;
                }
            }
            Action::Close | Action::UpgradeTls => {
                let _ = res.write_to(&mut writer);
                return;
            }
            Action::NoReply => {}
        }
    }
}

/// A loopback port with nothing listening (bound once, then released).
pub fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    listener.local_addr().expect("addr")
}
