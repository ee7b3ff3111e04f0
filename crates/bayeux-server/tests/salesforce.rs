//! The Salesforce emulator over real HTTP on port 0: OAuth grants, revocation, SOAP login, the
//! `/cometd/<version>` endpoint, and the event shapes of every channel kind. Faults, auth
//! failures and limits are in `salesforce_faults.rs`.

mod sf_common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bayeux_server::salesforce::config::{App, Channel, User};
use serde_json::{Value, json};
use sf_common::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn assert_json_content_type(r: &Resp) {
    assert_eq!(r.content_type(), "application/json;charset=UTF-8", "{r:?}");
}

/// Asserts an OAuth error: HTTP 400, JSON, exactly `{error, error_description}`.
fn assert_oauth_error(r: &Resp, error: &str, description: &str) {
    assert_eq!(r.status, 400, "{}", r.text);
    assert_json_content_type(r);
    assert_eq!(
        r.json(),
        json!({"error": error, "error_description": description})
    );
}

/// Asserts a token response as Salesforce sends it and returns the access token.
fn assert_token_response(org: &Org, r: &Resp, user_id: &str) -> String {
    assert_eq!(r.status, 200, "{}", r.text);
    assert_json_content_type(r);
    let body = r.json();
    assert_eq!(
        keys(&body),
        [
            "access_token",
            "id",
            "instance_url",
            "issued_at",
            "scope",
            "signature",
            "token_type"
        ],
        "{body}"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["instance_url"], org.base());
    assert_eq!(
        body["id"],
        format!("{}/id/{ORG_ID}/{user_id}", org.base()),
        "{body}"
    );
    assert_eq!(body["scope"], "api");
    let issued: u64 = body["issued_at"]
        .as_str()
        .expect("issued_at is a string")
        .parse()
        .expect("issued_at is epoch milliseconds");
    assert!(issued.abs_diff(now_ms()) < 60_000, "issued_at {issued}");
    let signature = body["signature"].as_str().expect("signature");
    assert_eq!(signature.len(), 44, "{signature}");
    assert!(signature.ends_with('='));
    assert!(
        signature
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
    );
    let token = body["access_token"].as_str().expect("access_token");
    assert!(token.starts_with(&format!("{}!", &ORG_ID[..15])), "{token}");
    token.to_owned()
}

/// Handshakes with `token` and asserts success.
async fn assert_streams(org: &Org, token: &str) {
    let mut c = org.client(token);
    c.handshake().await;
    let (reply, _) = c.connect_split().await;
    assert_eq!(reply["successful"], true, "{reply}");
}

fn password_form<'a>(client_secret: &'a str, password: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "password"),
        ("client_id", "demo"),
        ("client_secret", client_secret),
        ("username", "demo@example.com"),
        ("password", password),
    ]
}

#[tokio::test]
async fn password_grant() {
    let mut sf = demo();
    sf.users.push(User {
        username: "secure@example.com".into(),
        password: "pw".into(),
        security_token: "TOK".into(),
        user_id: "005000000000002AAA".into(),
        refresh_tokens: Vec::new(),
    });
    let org = Org::start(sf).await;
    let path = "/services/oauth2/token";

    let r = org.form(path, &password_form("demo", "demo")).await;
    let token = assert_token_response(&org, &r, USER_ID);
    assert_streams(&org, &token).await;

    // The security token is appended to the password.
    let secure = |password: &'static str| {
        vec![
            ("grant_type", "password"),
            ("client_id", "demo"),
            ("client_secret", "demo"),
            ("username", "secure@example.com"),
            ("password", password),
        ]
    };
    let r = org.form(path, &secure("pwTOK")).await;
    assert_token_response(&org, &r, "005000000000002AAA");
    let r = org.form(path, &secure("pw")).await;
    assert_oauth_error(&r, "invalid_grant", "authentication failure");

    let r = org.form(path, &password_form("demo", "wrong")).await;
    assert_oauth_error(&r, "invalid_grant", "authentication failure");
    let mut unknown_user = password_form("demo", "demo");
    unknown_user[3] = ("username", "nobody@example.com");
    let r = org.form(path, &unknown_user).await;
    assert_oauth_error(&r, "invalid_grant", "authentication failure");
    let mut missing_password = password_form("demo", "demo");
    missing_password.pop();
    let r = org.form(path, &missing_password).await;
    assert_oauth_error(&r, "invalid_grant", "authentication failure");

    let r = org.form(path, &password_form("wrong", "demo")).await;
    assert_oauth_error(&r, "invalid_client", "invalid client credentials");
    let mut unknown_app = password_form("demo", "demo");
    unknown_app[1] = ("client_id", "nope");
    let r = org.form(path, &unknown_app).await;
    assert_oauth_error(&r, "invalid_client_id", "client identifier invalid");
}

#[tokio::test]
async fn unsupported_grant_types() {
    let org = Org::start(demo()).await;
    let path = "/services/oauth2/token";
    let r = org
        .form(
            path,
            &[("grant_type", "urn:example:bogus"), ("client_id", "demo")],
        )
        .await;
    assert_oauth_error(&r, "unsupported_grant_type", "grant type not supported");
    let r = org
        .form(path, &[("client_id", "demo"), ("client_secret", "demo")])
        .await;
    assert_oauth_error(&r, "unsupported_grant_type", "grant type not supported");
}

#[tokio::test]
async fn refresh_token_grant() {
    let org = Org::start(demo()).await;
    let path = "/services/oauth2/token";
    let form = |client_id: &'static str, secret: &'static str, refresh: &'static str| {
        vec![
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("refresh_token", refresh),
        ]
    };
    let r = org
        .form(path, &form("demo", "demo", "demo-refresh-token"))
        .await;
    let token = assert_token_response(&org, &r, USER_ID);
    assert_streams(&org, &token).await;

    let r = org.form(path, &form("demo", "demo", "no-such-token")).await;
    assert_oauth_error(&r, "invalid_grant", "expired access/refresh token");
    let r = org
        .form(path, &form("demo", "wrong", "demo-refresh-token"))
        .await;
    assert_oauth_error(&r, "invalid_client", "invalid client credentials");
    let r = org
        .form(path, &form("nope", "demo", "demo-refresh-token"))
        .await;
    assert_oauth_error(&r, "invalid_client_id", "client identifier invalid");
}

#[tokio::test]
async fn client_credentials_grant() {
    let mut sf = demo();
    sf.apps.push(App {
        client_id: "nobody".into(),
        client_secret: "s".into(),
        run_as: None,
        jwt_public_key_file: None,
        jwt_public_key: None,
    });
    let org = Org::start(sf).await;
    let path = "/services/oauth2/token";
    let form = |client_id: &'static str, secret: &'static str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
        ]
    };
    let r = org.form(path, &form("demo", "demo")).await;
    let token = assert_token_response(&org, &r, USER_ID);
    assert_streams(&org, &token).await;

    let r = org.form(path, &form("demo", "wrong")).await;
    assert_oauth_error(&r, "invalid_client", "invalid client credentials");
    let r = org.form(path, &form("nope", "demo")).await;
    assert_oauth_error(&r, "invalid_client_id", "client identifier invalid");
    let r = org.form(path, &form("nobody", "s")).await;
    assert_oauth_error(&r, "invalid_grant", "no client credentials user enabled");
}

/// An RSA key pair made by the `openssl` command: (private PEM, public PEM).
fn rsa_pair() -> (String, String) {
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .expect("run openssl genpkey");
    assert!(out.status.success(), "openssl genpkey failed");
    let private = String::from_utf8(out.stdout).expect("PEM");
    let mut child = Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl pkey");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write key");
    let out = child.wait_with_output().expect("openssl pkey");
    assert!(out.status.success(), "openssl pkey failed");
    (private, String::from_utf8(out.stdout).expect("PEM"))
}

fn assertion(private_pem: &str, iss: &str, sub: &str, exp_offset_secs: i64) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let now = (now_ms() / 1000) as i64;
    let claims = json!({
        "iss": iss,
        "sub": sub,
        "aud": "https://login.salesforce.com",
        "exp": now + exp_offset_secs,
    });
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("private key");
    encode(&Header::new(Algorithm::RS256), &claims, &key).expect("sign")
}

#[tokio::test]
async fn jwt_bearer_grant() {
    let (private, public) = rsa_pair();
    let (other_private, _) = rsa_pair();
    let key_file = std::env::temp_dir().join(format!(
        "bayeux-sf-jwt-{}-{}.pem",
        std::process::id(),
        now_ms()
    ));
    std::fs::write(&key_file, &public).expect("write public key");
    let mut sf = demo();
    sf.apps.push(App {
        client_id: "jwt-app".into(),
        client_secret: "unused".into(),
        run_as: None,
        jwt_public_key_file: None,
        jwt_public_key: Some(public.clone()),
    });
    sf.apps.push(App {
        client_id: "jwt-file-app".into(),
        client_secret: "unused".into(),
        run_as: None,
        jwt_public_key_file: Some(key_file.to_string_lossy().into_owned()),
        jwt_public_key: None,
    });
    let org = Org::start(sf).await;
    let path = "/services/oauth2/token";
    let grant = "urn:ietf:params:oauth:grant-type:jwt-bearer";
    let post = |a: String| {
        let org = &org;
        async move {
            org.form(path, &[("grant_type", grant), ("assertion", &a)])
                .await
        }
    };

    let r = post(assertion(&private, "jwt-app", "demo@example.com", 300)).await;
    let token = assert_token_response(&org, &r, USER_ID);
    assert_streams(&org, &token).await;
    let r = post(assertion(&private, "jwt-file-app", "demo@example.com", 300)).await;
    assert_token_response(&org, &r, USER_ID);
    let _ = std::fs::remove_file(&key_file);

    // Signed with another key.
    let r = post(assertion(
        &other_private,
        "jwt-app",
        "demo@example.com",
        300,
    ))
    .await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    // Expired an hour ago.
    let r = post(assertion(&private, "jwt-app", "demo@example.com", -3600)).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    // An issuer that is no connected app.
    let r = post(assertion(&private, "unknown-app", "demo@example.com", 300)).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    // An app without a key.
    let r = post(assertion(&private, "demo", "demo@example.com", 300)).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    // A subject that is no user.
    let r = post(assertion(&private, "jwt-app", "nobody@example.com", 300)).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    // Not a JWT at all, and no assertion.
    let r = post("not.a.jwt".into()).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    let r = org.form(path, &[("grant_type", grant)]).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
    // HS256 with the public key as the secret (the classic algorithm confusion) is refused.
    let hs = {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
        let claims = json!({"iss":"jwt-app","sub":"demo@example.com","aud":"https://login.salesforce.com","exp": now_ms() / 1000 + 300});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(public.as_bytes()),
        )
        .expect("sign")
    };
    let r = post(hs).await;
    assert_oauth_error(&r, "invalid_grant", "invalid assertion");
}

#[tokio::test]
async fn revoke_kills_the_token_for_streaming() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let mut c = org.client(&token);
    c.handshake().await;
    let (first, _) = c.connect_split().await;
    assert_eq!(first["successful"], true);

    let r = org
        .form("/services/oauth2/revoke", &[("token", &token)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The next connect: 401::Authentication invalid, reconnect none (numeric id echoed).
    let replies = c
        .send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"long-polling","id":7}]))
        .await;
    assert_eq!(
        replies,
        vec![json!({
            "clientId": c.id(),
            "advice": {"reconnect": "none", "interval": 0},
            "channel": "/meta/connect",
            "id": 7,
            "error": "401::Authentication invalid",
            "successful": false,
        })]
    );
    // A new handshake with the dead token: 403::Handshake denied with the failure reason.
    let replies = c.send(Client::handshake_message("2x")).await;
    assert_eq!(
        replies,
        vec![json!({
            "ext": {"sfdc": {"failureReason": "401::Authentication invalid"}, "replay": true, "payload.format": true},
            "advice": {"reconnect": "none"},
            "channel": "/meta/handshake",
            "id": "2x",
            "error": "403::Handshake denied",
            "successful": false,
        })]
    );

    // Unknown tokens: Salesforce's answer.
    let r = org
        .form("/services/oauth2/revoke", &[("token", "never-issued")])
        .await;
    assert_oauth_error(
        &r,
        "unsupported_token_type",
        "this token type is not supported",
    );
    let r = org.form("/services/oauth2/revoke", &[]).await;
    assert_oauth_error(
        &r,
        "unsupported_token_type",
        "this token type is not supported",
    );

    // GET with ?token= works too.
    let other = org.token().await;
    let r = org
        .http
        .get(format!(
            "{}/services/oauth2/revoke?token={}",
            org.base(),
            url::form_urlencoded::byte_serialize(other.as_bytes()).collect::<String>()
        ))
        .send()
        .await
        .expect("get revoke");
    assert_eq!(r.status().as_u16(), 200);
    let mut c2 = org.client(&other);
    let replies = c2.send(Client::handshake_message("h")).await;
    assert_eq!(
        replies[0]["ext"]["sfdc"]["failureReason"],
        "401::Authentication invalid"
    );
    assert!(c2.client_id.take().is_none());

    // A revoked refresh token no longer grants.
    let r = org
        .form(
            "/services/oauth2/revoke",
            &[("token", "demo-refresh-token")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = org
        .form(
            "/services/oauth2/token",
            &[
                ("grant_type", "refresh_token"),
                ("client_id", "demo"),
                ("client_secret", "demo"),
                ("refresh_token", "demo-refresh-token"),
            ],
        )
        .await;
    assert_oauth_error(&r, "invalid_grant", "expired access/refresh token");
}

fn soap_login_body(username: &str, password: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8" ?><env:Envelope xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:env="http://schemas.xmlsoap.org/soap/envelope/"><env:Body><n1:login xmlns:n1="urn:partner.soap.sforce.com"><n1:username>{username}</n1:username><n1:password>{password}</n1:password></n1:login></env:Body></env:Envelope>"#
    )
}

fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].to_owned())
}

#[tokio::test]
async fn soap_login() {
    let org = Org::start(demo()).await;
    for path in ["/services/Soap/u/44.0", "/services/Soap/u/44.0/"] {
        let r = org
            .http
            .post(format!("{}{path}", org.base()))
            .header("content-type", "text/xml; charset=UTF-8")
            .header("SOAPAction", "login")
            .body(soap_login_body("demo@example.com", "demo"))
            .send()
            .await
            .expect("soap login");
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(ct, "text/xml;charset=UTF-8");
        let xml = r.text().await.unwrap();
        assert!(xml.starts_with("<?xml"), "{xml}");
        assert!(xml.contains("<loginResponse>"), "{xml}");
        assert_eq!(
            xml_text(&xml, "serverUrl").as_deref(),
            Some(format!("{}/services/Soap/u/44.0/{ORG_ID}", org.base()).as_str()),
            "{xml}"
        );
        assert_eq!(xml_text(&xml, "userId").as_deref(), Some(USER_ID));
        assert_eq!(xml_text(&xml, "organizationId").as_deref(), Some(ORG_ID));
        assert_eq!(
            xml_text(&xml, "userName").as_deref(),
            Some("demo@example.com")
        );
        assert_eq!(xml_text(&xml, "passwordExpired").as_deref(), Some("false"));
        let session = xml_text(&xml, "sessionId").expect("sessionId");
        // The session ID is a bearer token for streaming and REST (EMP-Connector's legacy login).
        assert_streams(&org, &session).await;
        org.publish_event(&session, "Demo__e", json!({})).await;
    }

    let r = org
        .http
        .post(format!("{}/services/Soap/u/44.0", org.base()))
        .header("content-type", "text/xml; charset=UTF-8")
        .body(soap_login_body("demo@example.com", "wrong"))
        .send()
        .await
        .expect("soap login");
    assert_eq!(r.status().as_u16(), 500);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/xml;charset=UTF-8"
    );
    let xml = r.text().await.unwrap();
    assert!(xml.contains("<soapenv:Fault>"), "{xml}");
    assert!(
        xml.contains(r#"xmlns:sf="urn:fault.partner.soap.sforce.com""#),
        "{xml}"
    );
    assert_eq!(
        xml_text(&xml, "faultcode").as_deref(),
        Some("sf:INVALID_LOGIN")
    );
    assert_eq!(
        xml_text(&xml, "faultstring").as_deref(),
        Some("INVALID_LOGIN: Invalid username, password, security token; or user locked out.")
    );
    assert_eq!(
        xml_text(&xml, "sf:exceptionCode").as_deref(),
        Some("INVALID_LOGIN")
    );
    assert_eq!(
        xml_text(&xml, "sf:exceptionMessage").as_deref(),
        Some("Invalid username, password, security token; or user locked out.")
    );
    assert!(!xml.contains("sessionId"), "{xml}");
}

#[tokio::test]
async fn handshake_reply_shape_and_cookies() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let c = org.client(&token);
    let r = c.post(Client::handshake_message("305")).await;
    assert_eq!(r.status, 200);
    assert_json_content_type(&r);
    let replies = r.json();
    let id = replies[0]["clientId"]
        .as_str()
        .expect("clientId")
        .to_owned();
    // The captured reply: no advice; ext announces replay and payload.format.
    assert_eq!(
        replies,
        json!([{
            "ext": {"replay": true, "payload.format": true},
            "minimumVersion": "1.0",
            "clientId": id,
            "supportedConnectionTypes": ["long-polling"],
            "channel": "/meta/handshake",
            "id": "305",
            "version": "1.0",
            "successful": true,
        }])
    );
    // Even without the replay extension in the request, the reply announces it.
    let replies = c
        .send(json!([{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"2"}]))
        .await;
    assert_eq!(
        replies[0]["ext"],
        json!({"replay": true, "payload.format": true})
    );
    assert!(replies[0].get("advice").is_none(), "{}", replies[0]);

    // Both Salesforce cookies are set.
    let cookies = r.set_cookies();
    let browser = cookies
        .iter()
        .find(|c| c.starts_with("BAYEUX_BROWSER="))
        .unwrap_or_else(|| panic!("no BAYEUX_BROWSER cookie: {cookies:?}"));
    let stream = cookies
        .iter()
        .find(|c| c.starts_with("sfdc-stream="))
        .unwrap_or_else(|| panic!("no sfdc-stream cookie: {cookies:?}"));
    for cookie in [browser, stream] {
        assert!(cookie.contains("Path=/"), "{cookie}");
        let value = cookie.split(';').next().unwrap().split_once('=').unwrap().1;
        assert!(!value.is_empty(), "{cookie}");
    }
    // A client that returns them is not given new ones, and is still served.
    let cookie_header = [browser, stream]
        .iter()
        .map(|c| c.split(';').next().unwrap())
        .collect::<Vec<_>>()
        .join("; ");
    let r = c
        .http
        .post(&c.url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .header("cookie", cookie_header)
        .body(
            json!([{"channel":"/meta/connect","clientId":id,"connectionType":"long-polling","id":"c"}])
                .to_string(),
        )
        .send()
        .await
        .expect("connect");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers().get_all("set-cookie").iter().next().is_none(),
        "{:?}",
        r.headers()
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body[0]["successful"], true, "{body}");
}

#[tokio::test]
async fn authorization_header_forms() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    for auth in [
        format!("Bearer {token}"),
        format!("OAuth {token}"),
        token.clone(),
        format!("bearer {token}"),
    ] {
        let mut c = Client::new(&org.endpoint(), Some(auth.clone()));
        c.handshake().await;
        let sub = c.subscribe("/event/Demo__e", None).await;
        assert_eq!(sub["successful"], true, "{auth}: {sub}");
        let (reply, _) = c.connect_split().await;
        assert_eq!(reply["successful"], true, "{auth}: {reply}");
    }
    // A wrong token in any form: the handshake is denied as for a dead token.
    for auth in ["Bearer nope", "OAuth nope", "nope"] {
        let c = Client::new(&org.endpoint(), Some(auth.into()));
        let replies = c.send(Client::handshake_message("h")).await;
        assert_eq!(replies[0]["error"], "403::Handshake denied", "{auth}");
        assert_eq!(
            replies[0]["ext"]["sfdc"]["failureReason"], "401::Authentication invalid",
            "{auth}"
        );
    }
}

#[tokio::test]
async fn missing_authorization_header() {
    let org = Org::start(demo()).await;
    let c = Client::new(&org.endpoint(), None);
    let r = c.post(Client::handshake_message("1")).await;
    assert_eq!(r.status, 200);
    assert_json_content_type(&r);
    assert_eq!(
        r.json(),
        json!([{
            "ext": {"sfdc": {"failureReason": "401::Request requires authentication"}, "replay": true, "payload.format": true},
            "advice": {"reconnect": "none"},
            "channel": "/meta/handshake",
            "id": "1",
            "error": "403::Handshake denied",
            "successful": false,
        }])
    );
}

#[tokio::test]
async fn version_errors_and_path_suffixes() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let missing = "400::API version in the URI is mandatory. URI format: '/cometd/66.0'";
    let old = "400::Unsupported API version. Only API versions '37.0' and later are supported. URI format: '/cometd/66.0'";
    let base = &org.server.url;
    for (url, error) in [
        (base.clone(), missing),
        (format!("{base}/"), missing),
        (format!("{base}/latest"), missing),
        (format!("{base}/36.0"), old),
        (format!("{base}/23.0/handshake"), old),
    ] {
        let c = Client::new(&url, Some(format!("Bearer {token}")));
        let r = c.post(Client::handshake_message("1")).await;
        assert_eq!(r.status, 400, "{url}: {}", r.text);
        assert_json_content_type(&r);
        assert_eq!(
            r.json(),
            json!([{"channel": "/meta/handshake", "id": "1", "error": error, "successful": false}]),
            "{url}"
        );
    }
    // Every message of the request is answered with the error.
    let c = Client::new(&format!("{base}/36.0"), Some(format!("Bearer {token}")));
    let r = c
        .post(json!([{"channel":"/meta/connect","clientId":"x","id":"a"},{"channel":"/meta/subscribe","clientId":"x","subscription":"/event/Demo__e","id":"b"}]))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!([
            {"channel": "/meta/connect", "id": "a", "error": old, "successful": false},
            {"channel": "/meta/subscribe", "id": "b", "error": old, "successful": false},
        ])
    );

    // 37.0 is the oldest accepted; suffixes such as /handshake are accepted and ignored.
    let mut c = Client::new(&format!("{base}/37.0"), Some(format!("Bearer {token}")));
    c.handshake().await;
    let mut c = Client::new(
        &format!("{base}/59.0/handshake"),
        Some(format!("Bearer {token}")),
    );
    c.handshake().await;
    c.url = format!("{base}/59.0/subscribe");
    let sub = c.subscribe("/event/Demo__e", None).await;
    assert_eq!(sub["successful"], true, "{sub}");
    c.url = format!("{base}/59.0/connect");
    let (reply, _) = c.connect_split().await;
    assert_eq!(reply["successful"], true, "{reply}");
}

#[tokio::test]
async fn long_polling_only() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let c = org.client(&token);
    let replies = c
        .send(json!([{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["websocket"],"id":"1"}]))
        .await;
    assert_eq!(replies[0]["successful"], false, "{}", replies[0]);
    assert_eq!(
        replies[0]["error"],
        "400::Invalid connection type {websocket}"
    );
    assert!(replies[0].get("clientId").is_none());

    let mut c = org.client(&token);
    c.handshake().await;
    let replies = c
        .send(json!([{"channel":"/meta/connect","clientId":c.id(),"connectionType":"websocket","id":"2"}]))
        .await;
    assert_eq!(replies[0]["successful"], false, "{}", replies[0]);
    assert_eq!(
        replies[0]["error"],
        "400::Invalid connection type {websocket}"
    );

    // A WebSocket upgrade is refused.
    let ws = format!("{}/{VERSION}", org.server.ws_url);
    assert!(tokio_tungstenite::connect_async(ws).await.is_err());
}

#[tokio::test]
async fn first_connect_at_once_then_held_without_advice() {
    let org = Org::start(demo()).await;
    let mut c = org.client(&org.token().await);
    c.handshake().await;
    let start = tokio::time::Instant::now();
    let replies = c.send(c.connect_message("85")).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "first connect held"
    );
    assert_eq!(
        replies,
        vec![json!({
            "clientId": c.id(),
            "advice": {"interval": 0, "timeout": 2000, "reconnect": "retry"},
            "channel": "/meta/connect",
            "id": "85",
            "successful": true,
        })]
    );
    for id in ["86", "87"] {
        let start = tokio::time::Instant::now();
        let replies = c.send(c.connect_message(id)).await;
        let held = start.elapsed();
        assert!(
            held >= Duration::from_millis(1900) && held < Duration::from_secs(5),
            "held {held:?}"
        );
        assert_eq!(
            replies,
            vec![
                json!({"clientId": c.id(), "channel": "/meta/connect", "id": id, "successful": true})
            ]
        );
    }
}

#[tokio::test]
async fn default_org_advises_110_seconds() {
    let mut sf = bayeux_server::salesforce::SalesforceConfig::demo();
    sf.reconnect_deadline_secs = 10;
    let org = Org::start(sf).await;
    let mut c = org.client(&org.token().await);
    c.handshake().await;
    let (reply, _) = c.connect_split().await;
    assert_eq!(
        reply["advice"],
        json!({"interval": 0, "timeout": 110000, "reconnect": "retry"})
    );
}

/// A handshake body of exactly `len` bytes.
fn handshake_of_len(len: usize) -> String {
    let make = |pad: &str| {
        json!([{"channel":"/meta/handshake","version":"1.0","supportedConnectionTypes":["long-polling"],"id":"big","ext":{"replay":true,"pad":pad}}]).to_string()
    };
    let empty = make("").len();
    let body = make(&"x".repeat(len - empty));
    assert_eq!(body.len(), len);
    body
}

#[tokio::test]
async fn body_limit_is_32768_bytes() {
    let org = Org::start(demo()).await;
    let c = org.client(&org.token().await);
    let r = c
        .try_post_raw("application/json", handshake_of_len(32_768))
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()[0]["successful"], true, "{}", r.text);

    for len in [32_769, 100_000] {
        let r = c
            .try_post_raw("application/json", handshake_of_len(len))
            .await
            .expect("request");
        assert_eq!(r.status, 413, "{len}: {}", r.text);
        assert_json_content_type(&r);
        let body = r.json();
        assert_eq!(
            body[0]["error"], "413::Maximum Request Size Exceeded",
            "{body}"
        );
        assert_eq!(body[0]["successful"], false);
    }
}

#[tokio::test]
async fn form_encoded_message_parameter_is_accepted() {
    let org = Org::start(demo()).await;
    let c = org.client(&org.token().await);
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("message", &Client::handshake_message("f").to_string())
        .finish();
    let r = c
        .try_post_raw("application/x-www-form-urlencoded", body)
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()[0]["successful"], true, "{}", r.text);
}

#[tokio::test]
async fn client_publish_is_refused() {
    let org = Org::start(demo()).await;
    let mut c = org.client(&org.token().await);
    c.ready(&["/event/Demo__e"]).await;
    for channel in [
        "/event/Demo__e",
        "/topic/DemoTopic",
        "/u/Demo",
        "/u/Undeclared",
    ] {
        let replies = c
            .send(json!([{"channel":channel,"clientId":c.id(),"data":{"x":1},"id":"p"}]))
            .await;
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0]["channel"], channel);
        assert_eq!(replies[0]["id"], "p");
        assert_eq!(replies[0]["successful"], false, "{}", replies[0]);
        assert_eq!(replies[0]["error"], "403::Restricted channel", "{channel}");
    }
    // Nothing was stored.
    assert!(
        org.server
            .broker
            .engine()
            .channels()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn subscribe_replies() {
    let org = Org::start(demo()).await;
    let mut c = org.client(&org.token().await);
    c.handshake().await;
    let ok = c.subscribe("/event/Demo__e", None).await;
    assert_eq!(
        ok,
        json!({"clientId": c.id(), "channel": "/meta/subscribe", "id": "s", "subscription": "/event/Demo__e", "successful": true})
    );
    for channel in [
        "/topic/AccountUpdates",
        "/event/Nope__e",
        "/u/Nope",
        "/data/AccountChangeEvent",
    ] {
        let r = c.subscribe(channel, None).await;
        assert_eq!(
            r,
            json!({
                "clientId": c.id(),
                "channel": "/meta/subscribe",
                "id": "s",
                "subscription": channel,
                "error": format!("400::The channel you requested to subscribe to does not exist {{{channel}}}"),
                "successful": false,
            })
        );
    }
    // The filter is not part of the channel's name.
    let r = c.subscribe("/topic/AccountUpdates?Name=Acme", None).await;
    assert_eq!(
        r["error"],
        "400::The channel you requested to subscribe to does not exist {/topic/AccountUpdates}"
    );
    let unsub = c
        .send(json!([{"channel":"/meta/unsubscribe","clientId":c.id(),"subscription":"/event/Demo__e","id":"u"}]))
        .await;
    assert_eq!(unsub[0]["successful"], true, "{}", unsub[0]);
    assert_eq!(unsub[0]["subscription"], "/event/Demo__e");
}

#[tokio::test]
async fn platform_event_publish_and_delivery() {
    let org = Org::start(demo()).await;
    let sub = org.subscriber(&["/event/Demo__e"]).await;
    let token = org.token().await;

    let path = format!("/services/data/v{VERSION}/sobjects/Demo__e/");
    let r = org
        .post_json(
            &path,
            Some(&token),
            json!({"Printer_Model__c": "XZO-5", "Ink_Percentage__c": 0.2}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_json_content_type(&r);
    let body = r.json();
    let uuid = body["errors"][0]["message"]
        .as_str()
        .expect("uuid")
        .to_owned();
    assert!(is_uuid(&uuid), "{uuid}");
    let id = body["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 18, "{id}");
    assert!(id.starts_with("e0"), "{id}");
    assert_eq!(
        body,
        json!({"id": id, "success": true, "errors": [{"statusCode": "OPERATION_ENQUEUED", "message": uuid, "fields": []}]})
    );

    let got = sub.receive(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let event = &got[0];
    assert_eq!(keys(event), ["channel", "data"], "{event}");
    assert_eq!(event["channel"], "/event/Demo__e");
    let data = &event["data"];
    assert_eq!(keys(data), ["event", "payload", "schema"], "{data}");
    let schema = data["schema"].as_str().expect("schema");
    assert_eq!(schema.len(), 22, "{schema}");
    assert!(
        schema
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    let created = data["payload"]["CreatedDate"]
        .as_str()
        .expect("CreatedDate");
    assert!(is_iso_millis(created), "{created}");
    assert_eq!(
        data["payload"],
        json!({"Printer_Model__c": "XZO-5", "Ink_Percentage__c": 0.2, "CreatedDate": created, "CreatedById": USER_ID})
    );
    let replay_id = data["event"]["replayId"].as_u64().expect("replayId");
    assert_eq!(
        data["event"],
        json!({"EventUuid": uuid, "replayId": replay_id})
    );

    // The same event object without the trailing slash; the schema is stable per event type.
    let second = org
        .post_json(
            &format!("/services/data/v{VERSION}/sobjects/Demo__e"),
            Some(&token),
            json!({"Printer_Model__c": "B"}),
        )
        .await;
    assert_eq!(second.status, 201, "{}", second.text);
    let got = sub.receive(1).await;
    assert_eq!(got[0]["data"]["schema"], schema);
    assert!(got[0]["data"]["event"]["replayId"].as_u64().unwrap() > replay_id);
    assert_eq!(
        got[0]["data"]["event"]["EventUuid"],
        second.json()["errors"][0]["message"]
    );

    // Without a valid token: 401 INVALID_SESSION_ID.
    for token in [None, Some("bogus")] {
        let r = org.post_json(&path, token, json!({})).await;
        assert_eq!(r.status, 401, "{}", r.text);
        assert_json_content_type(&r);
        assert_eq!(
            r.json(),
            json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}])
        );
    }
    // An event the org does not have, or an object that is no event: 404 NOT_FOUND.
    for object in ["Nope__e", "Account"] {
        let r = org
            .post_json(
                &format!("/services/data/v{VERSION}/sobjects/{object}/"),
                Some(&token),
                json!({}),
            )
            .await;
        assert_eq!(r.status, 404, "{object}: {}", r.text);
        assert_eq!(
            r.json(),
            json!([{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}])
        );
    }
    // A body that is not a JSON object.
    let r = org.post_json(&path, Some(&token), json!([1])).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()[0]["errorCode"], "JSON_PARSER_ERROR");
}

#[tokio::test]
async fn replay_after_rest_publishing() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let mut uuids = Vec::new();
    for n in 0..3 {
        let body = org
            .publish_event(&token, "Demo__e", json!({ "N__c": n }))
            .await;
        uuids.push(body["errors"][0]["message"].clone());
    }

    // -2: everything retained, in order, with the same EventUuids.
    let mut all = org.client(&token);
    all.handshake().await;
    let r = all
        .subscribe("/event/Demo__e", Some(json!({"/event/Demo__e": -2})))
        .await;
    assert_eq!(r["successful"], true, "{r}");
    let got = all.receive(3).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let replay_ids: Vec<u64> = got
        .iter()
        .map(|e| e["data"]["event"]["replayId"].as_u64().expect("replayId"))
        .collect();
    assert!(replay_ids.windows(2).all(|w| w[0] < w[1]), "{replay_ids:?}");
    for (n, e) in got.iter().enumerate() {
        assert_eq!(e["channel"], "/event/Demo__e");
        assert_eq!(e["data"]["payload"]["N__c"], n);
        assert_eq!(e["data"]["event"]["EventUuid"], uuids[n]);
    }

    // N: the events after N.
    let mut after = org.client(&token);
    after.handshake().await;
    let r = after
        .subscribe(
            "/event/Demo__e",
            Some(json!({"/event/Demo__e": replay_ids[0], "/topic/Other": -1})),
        )
        .await;
    assert_eq!(r["successful"], true, "{r}");
    let got = after.receive(2).await;
    let ids: Vec<u64> = got
        .iter()
        .map(|e| e["data"]["event"]["replayId"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, replay_ids[1..]);

    // -1: new events only.
    let mut live = org.client(&token);
    live.handshake().await;
    let r = live
        .subscribe("/event/Demo__e", Some(json!({"/event/Demo__e": -1})))
        .await;
    assert_eq!(r["successful"], true, "{r}");
    let (reply, deliveries) = live.connect_split().await;
    assert_eq!(reply["successful"], true);
    assert!(deliveries.is_empty(), "{deliveries:?}");

    // A replay ID never issued.
    let bogus = replay_ids[2] + 1000;
    let r = live
        .subscribe("/event/Demo__e", Some(json!({"/event/Demo__e": bogus})))
        .await;
    assert_eq!(
        r,
        json!({
            "clientId": live.id(),
            "channel": "/meta/subscribe",
            "id": "s",
            "subscription": "/event/Demo__e",
            "error": format!("400::The replayId {{{bogus}}} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."),
            "successful": false,
        })
    );
    // A map without the channel.
    let r = live
        .subscribe("/event/Demo__e", Some(json!({"/event/Other__e": -1})))
        .await;
    assert_eq!(
        r["error"],
        "400::The replayId for channel {/event/Demo__e} wasn't found using the provided replay ID map {{/event/Other__e=-1}}. Ensure that the channel name you provided in the replay map is valid and matches the channel name used for subscribing."
    );
}

#[tokio::test]
async fn push_topic_events_and_filters() {
    let org = Org::start(demo()).await;
    let token = org.token().await;
    let all = org.subscriber(&["/topic/DemoTopic"]).await;

    let mut acme = org.client(&token);
    acme.handshake().await;
    let r = acme
        .subscribe(
            "/topic/DemoTopic?Name=Acme",
            Some(json!({"/topic/DemoTopic": -1})),
        )
        .await;
    assert_eq!(
        r,
        json!({"clientId": acme.id(), "channel": "/meta/subscribe", "id": "s", "subscription": "/topic/DemoTopic?Name=Acme", "successful": true})
    );
    let (first, _) = acme.connect_split().await;
    assert_eq!(first["successful"], true);

    // The replay map must be keyed without the filter.
    let mut wrong = org.client(&token);
    wrong.handshake().await;
    let r = wrong
        .subscribe(
            "/topic/DemoTopic?Name=Acme",
            Some(json!({"/topic/DemoTopic?Name=Acme": -1})),
        )
        .await;
    assert_eq!(r["successful"], false, "{r}");
    assert_eq!(
        r["error"],
        "400::The replayId for channel {/topic/DemoTopic} wasn't found using the provided replay ID map {{/topic/DemoTopic?Name=Acme=-1}}. Ensure that the channel name you provided in the replay map is valid and matches the channel name used for subscribing."
    );

    let other = org
        .emulate(
            "channel=/topic/DemoTopic",
            json!({"Id": "001000000000001AAA", "Name": "Other", "Website": null}),
        )
        .await;
    let matching = org
        .emulate(
            "channel=/topic/DemoTopic&type=updated",
            json!({"Id": "001000000000002AAA", "Name": "Acme", "Website": null}),
        )
        .await;
    assert!(matching > other);

    let got = all.receive(2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let created = got[0]["data"]["event"]["createdDate"]
        .as_str()
        .expect("createdDate")
        .to_owned();
    assert!(is_iso_millis(&created), "{created}");
    assert_eq!(
        got[0],
        json!({
            "channel": "/topic/DemoTopic",
            "data": {
                "event": {"createdDate": created, "replayId": other, "type": "created"},
                "sobject": {"Id": "001000000000001AAA", "Name": "Other", "Website": null},
            },
        })
    );
    assert_eq!(got[1]["data"]["event"]["type"], "updated");
    assert_eq!(got[1]["data"]["event"]["replayId"], matching);

    // The filtered subscriber gets only the matching record.
    let got = acme.receive(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["channel"], "/topic/DemoTopic");
    assert_eq!(got[0]["data"]["sobject"]["Name"], "Acme");
    assert_eq!(got[0]["data"]["event"]["replayId"], matching);
    let third = org
        .emulate(
            "channel=/topic/DemoTopic",
            json!({"Id": "001000000000003AAA", "Name": "Acme"}),
        )
        .await;
    let got = acme.receive(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["data"]["event"]["replayId"], third);

    // Replay with a filter: only the matching history.
    let mut replayed = org.client(&token);
    replayed.handshake().await;
    let r = replayed
        .subscribe(
            "/topic/DemoTopic?Name=Acme",
            Some(json!({"/topic/DemoTopic": -2})),
        )
        .await;
    assert_eq!(r["successful"], true, "{r}");
    let got = replayed.receive(2).await;
    let ids: Vec<&Value> = got
        .iter()
        .map(|e| &e["data"]["event"]["replayId"])
        .collect();
    assert_eq!(ids, [&json!(matching), &json!(third)]);

    // The emulator's publish route: an undeclared channel is 404.
    let r = org
        .post_json(
            "/_emulator/publish?channel=/topic/Nope",
            None,
            json!({"Name": "x"}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
}

#[tokio::test]
async fn generic_streaming_push() {
    let other_user = "005000000000002AAA";
    let mut sf = demo();
    sf.users.push(User {
        username: "other@example.com".into(),
        password: "pw".into(),
        security_token: String::new(),
        user_id: other_user.into(),
        refresh_tokens: Vec::new(),
    });
    let org = Org::start(sf).await;
    let sub = org.subscriber(&["/u/Demo"]).await;
    let token = org.token().await;
    let other_token = {
        let r = org
            .form(
                "/services/oauth2/token",
                &[
                    ("grant_type", "password"),
                    ("client_id", "demo"),
                    ("client_secret", "demo"),
                    ("username", "other@example.com"),
                    ("password", "pw"),
                ],
            )
            .await;
        assert_token_response(&org, &r, other_user)
    };
    let mut other = org.client(&other_token);
    other.ready(&["/u/Demo"]).await;
    let path = format!("/services/data/v{VERSION}/sobjects/StreamingChannel/{GENERIC_ID}/push");

    // Broadcast: fanoutCount -1.
    let r = org
        .post_json(
            &path,
            Some(&token),
            json!({"pushEvents": [{"payload": "broadcast", "userIds": []}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_json_content_type(&r);
    assert_eq!(
        r.json(),
        json!([{"fanoutCount": -1, "userOnlineStatus": {}}])
    );
    let got = sub.receive(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let created = got[0]["data"]["event"]["createdDate"]
        .as_str()
        .expect("createdDate")
        .to_owned();
    assert!(is_iso_millis(&created), "{created}");
    let broadcast_id = got[0]["data"]["event"]["replayId"]
        .as_u64()
        .expect("replayId");
    assert_eq!(
        got[0],
        json!({"channel": "/u/Demo", "data": {"event": {"createdDate": created, "replayId": broadcast_id}, "payload": "broadcast"}})
    );
    let got = other.receive(1).await;
    assert_eq!(got[0]["data"]["payload"], "broadcast");

    // Targeted: counted, with each user's online status; only the named users receive it.
    let offline = "005000000000009AAA";
    let r = org
        .post_json(
            &path,
            Some(&token),
            json!({"pushEvents": [
                {"payload": "hello world!", "userIds": [USER_ID, offline]},
                {"payload": "nobody home", "userIds": [offline]},
                {"payload": "for the other user", "userIds": [other_user]},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json(),
        json!([
            {"fanoutCount": 1, "userOnlineStatus": {USER_ID: true, offline: false}},
            {"fanoutCount": 0, "userOnlineStatus": {offline: false}},
            {"fanoutCount": 1, "userOnlineStatus": {other_user: true}},
        ])
    );
    let got = sub.receive(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["channel"], "/u/Demo");
    assert_eq!(got[0]["data"]["payload"], "hello world!");
    // The server-only audience never reaches a client.
    assert_eq!(keys(&got[0]), ["channel", "data"], "{}", got[0]);
    assert_eq!(keys(&got[0]["data"]), ["event", "payload"], "{}", got[0]);
    let created = got[0]["data"]["event"]["createdDate"].as_str().unwrap();
    assert!(is_iso_millis(created), "{created}");
    let targeted_id = got[0]["data"]["event"]["replayId"]
        .as_u64()
        .unwrap_or_else(|| panic!("a targeted generic event has a replayId: {}", got[0]));
    assert!(targeted_id > broadcast_id);
    let got = other.receive(1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["data"]["payload"], "for the other user");
    let other_id = got[0]["data"]["event"]["replayId"].as_u64().unwrap();

    // Who is online.
    let r = org.get(&path, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut online = r.json();
    let ids = online["OnlineUserIds"]
        .as_array_mut()
        .expect("OnlineUserIds");
    ids.sort_by_key(|v| v.to_string());
    assert_eq!(
        online,
        json!({"OnlineUserIds": [USER_ID, other_user], "ChannelName": "/u/Demo"})
    );

    // Every push is durable: a late subscriber replays the broadcasts and the events that
    // named its user, and nothing else.
    for (token, expected) in [
        (
            &token,
            vec![("broadcast", broadcast_id), ("hello world!", targeted_id)],
        ),
        (
            &other_token,
            vec![
                ("broadcast", broadcast_id),
                ("for the other user", other_id),
            ],
        ),
    ] {
        let mut late = org.client(token);
        late.handshake().await;
        let r = late
            .subscribe("/u/Demo", Some(json!({"/u/Demo": -2})))
            .await;
        assert_eq!(r["successful"], true, "{r}");
        let (_, got) = late.connect_split().await;
        let got: Vec<(&str, u64)> = got
            .iter()
            .map(|e| {
                (
                    e["data"]["payload"].as_str().unwrap(),
                    e["data"]["event"]["replayId"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, expected);
    }

    // Errors: payload over 3,000 characters, unknown channel ID, no token.
    let r = org
        .post_json(
            &path,
            Some(&token),
            json!({"pushEvents": [{"payload": "x".repeat(3001), "userIds": []}]}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()[0]["errorCode"], "STRING_TOO_LONG");
    let r = org
        .post_json(
            &format!("/services/data/v{VERSION}/sobjects/StreamingChannel/0M6000000000099AAA/push"),
            Some(&token),
            json!({"pushEvents": []}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = org.post_json(&path, None, json!({"pushEvents": []})).await;
    assert_eq!(r.status, 401, "{}", r.text);
}

#[tokio::test]
async fn change_data_capture_shape() {
    let mut sf = demo();
    sf.channels.push(Channel {
        name: "/data/AccountChangeEvent".into(),
        kind: None,
        id: None,
    });
    let org = Org::start(sf).await;
    let sub = org.subscriber(&["/data/AccountChangeEvent"]).await;
    let before = now_ms();
    let created = org
        .emulate(
            "channel=/data/AccountChangeEvent",
            json!({"Id": "001000000000001AAA", "Name": "Acme", "OwnerId": USER_ID}),
        )
        .await;
    let updated = org
        .emulate(
            "channel=/data/AccountChangeEvent&changeType=UPDATE",
            json!({"Id": "001000000000001AAA", "Name": "Acme Corp"}),
        )
        .await;
    let got = sub.receive(2).await;
    assert_eq!(got.len(), 2, "{got:?}");

    let e = &got[0];
    assert_eq!(keys(e), ["channel", "data"], "{e}");
    assert_eq!(e["channel"], "/data/AccountChangeEvent");
    let data = &e["data"];
    assert_eq!(keys(data), ["event", "payload", "schema"], "{data}");
    assert_eq!(data["schema"].as_str().map(str::len), Some(22), "{data}");
    assert_eq!(data["event"], json!({"replayId": created}));
    let payload = &data["payload"];
    // The record ID travels in the header only; nulledFields and diffFields are not sent.
    assert_eq!(
        keys(payload),
        ["ChangeEventHeader", "Name", "OwnerId"],
        "{payload}"
    );
    assert_eq!(payload["Name"], "Acme");
    let header = &payload["ChangeEventHeader"];
    assert_eq!(
        keys(header),
        [
            "changeOrigin",
            "changeType",
            "changedFields",
            "commitNumber",
            "commitTimestamp",
            "commitUser",
            "entityName",
            "isTransactionEnd",
            "recordIds",
            "sequenceNumber",
            "transactionKey"
        ],
        "{header}"
    );
    assert_eq!(header["entityName"], "Account");
    assert_eq!(header["recordIds"], json!(["001000000000001AAA"]));
    assert_eq!(header["changeType"], "CREATE");
    assert_eq!(header["changeOrigin"], "com.salesforce.core");
    assert!(
        is_uuid(header["transactionKey"].as_str().unwrap()),
        "{header}"
    );
    assert_eq!(header["sequenceNumber"], 1);
    assert_eq!(header["isTransactionEnd"], true);
    let commit = header["commitTimestamp"].as_u64().expect("epoch ms");
    assert!(commit >= before && commit <= now_ms(), "{commit}");
    assert!(header["commitNumber"].is_u64(), "{header}");
    assert_eq!(header["commitUser"], USER_ID);
    assert_eq!(header["changedFields"], json!([]));

    // An update lists the updated fields.
    let header = &got[1]["data"]["payload"]["ChangeEventHeader"];
    assert_eq!(got[1]["data"]["event"]["replayId"], updated);
    assert_eq!(header["changeType"], "UPDATE");
    assert_eq!(header["changedFields"], json!(["Name"]));
    assert_eq!(got[1]["data"]["payload"]["Name"], "Acme Corp");
}
