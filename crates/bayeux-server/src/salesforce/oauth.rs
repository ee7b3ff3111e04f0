//! OAuth 2.0 token endpoint, token revocation and the SOAP login, as Salesforce answers them.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use super::Emulator;
#[cfg(test)]
use super::random_alnum;

/// The JWT bearer grant type.
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub(crate) fn routes(emulator: Arc<Emulator>) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/oauth2/revoke", post(revoke).get(revoke_get))
        .route("/services/Soap/u/{version}", post(soap_login))
        .route("/services/Soap/u/{version}/", post(soap_login))
        .with_state(emulator)
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    r
}

fn oauth_error(error: &str, description: &str) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": error, "error_description": description}),
    )
}

fn invalid_grant() -> Response {
    oauth_error("invalid_grant", "authentication failure")
}

fn form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn success(e: &Emulator, user: usize, refresh_token: Option<&str>) -> Response {
    let token = e.issue(user);
    let issued_at = bayeux_engine::now_ms().to_string();
    let mut signature = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut signature[..]);
    let mut body = json!({
        "access_token": token,
        "instance_url": e.instance_url(),
        "id": format!("{}/id/{}/{}", e.instance_url(), e.config.org_id, e.config.users[user].user_id),
        "token_type": "Bearer",
        "issued_at": issued_at,
        "signature": base64_std(&signature),
        "scope": "api",
    });
    if let Some(r) = refresh_token {
        body["refresh_token"] = Value::String(r.to_owned());
    }
    json_response(StatusCode::OK, body)
}

fn base64_std(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn app_index(e: &Emulator, client_id: Option<&String>) -> Option<usize> {
    let id = client_id?;
    e.config.apps.iter().position(|a| &a.client_id == id)
}

async fn token(State(e): State<Arc<Emulator>>, body: Bytes) -> Response {
    let f = form(&body);
    let Some(grant) = f.get("grant_type") else {
        return oauth_error("unsupported_grant_type", "grant type not supported");
    };
    match grant.as_str() {
        "password" => {
            let Some(app) = app_index(&e, f.get("client_id")) else {
                return oauth_error("invalid_client_id", "client identifier invalid");
            };
            if f.get("client_secret") != Some(&e.config.apps[app].client_secret) {
                return oauth_error("invalid_client", "invalid client credentials");
            }
            let (Some(username), Some(password)) = (f.get("username"), f.get("password")) else {
                return invalid_grant();
            };
            match e.config.users.iter().position(|u| {
                &u.username == username
                    && *password == format!("{}{}", u.password, u.security_token)
            }) {
                Some(user) => success(&e, user, None),
                None => invalid_grant(),
            }
        }
        "refresh_token" => {
            let Some(app) = app_index(&e, f.get("client_id")) else {
                return oauth_error("invalid_client_id", "client identifier invalid");
            };
            if let Some(secret) = f.get("client_secret")
                && secret != &e.config.apps[app].client_secret
            {
                return oauth_error("invalid_client", "invalid client credentials");
            }
            let Some(refresh) = f.get("refresh_token") else {
                return invalid_grant();
            };
            if e.refresh_revoked(refresh) {
                return oauth_error("invalid_grant", "expired access/refresh token");
            }
            match e
                .config
                .users
                .iter()
                .position(|u| u.refresh_tokens.iter().any(|r| r == refresh))
            {
                Some(user) => success(&e, user, None),
                None => oauth_error("invalid_grant", "expired access/refresh token"),
            }
        }
        "client_credentials" => {
            let Some(app) = app_index(&e, f.get("client_id")) else {
                return oauth_error("invalid_client_id", "client identifier invalid");
            };
            let app = &e.config.apps[app];
            if f.get("client_secret") != Some(&app.client_secret) {
                return oauth_error("invalid_client", "invalid client credentials");
            }
            let user = app
                .run_as
                .as_ref()
                .and_then(|name| e.config.users.iter().position(|u| &u.username == name));
            match user {
                Some(user) => success(&e, user, None),
                None => oauth_error("invalid_grant", "no client credentials user enabled"),
            }
        }
        JWT_BEARER => match f.get("assertion").and_then(|a| verify_jwt(&e, a)) {
            Some(user) => success(&e, user, None),
            None => oauth_error("invalid_grant", "invalid assertion"),
        },
        _ => oauth_error("unsupported_grant_type", "grant type not supported"),
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    iss: String,
    sub: String,
}

/// Verifies an RS256 assertion: `iss` names a connected app whose configured public key
/// checks the signature, `exp` is in the future, `sub` is a user. Returns the user.
fn verify_jwt(e: &Emulator, assertion: &str) -> Option<usize> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
    let header = decode_header(assertion).ok()?;
    if header.alg != Algorithm::RS256 {
        return None;
    }
    let unverified: Claims = {
        let payload = assertion.split('.').nth(1)?;
        let bytes = base64_url_decode(payload)?;
        serde_json::from_slice(&bytes).ok()?
    };
    let app = e
        .config
        .apps
        .iter()
        .find(|a| a.client_id == unverified.iss)?;
    let pem = match (&app.jwt_public_key, &app.jwt_public_key_file) {
        (Some(pem), _) => pem.clone(),
        (None, Some(file)) => std::fs::read_to_string(file).ok()?,
        (None, None) => return None,
    };
    let key = DecodingKey::from_rsa_pem(pem.as_bytes()).ok()?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    let claims = decode::<Claims>(assertion, &key, &validation).ok()?.claims;
    e.config.users.iter().position(|u| u.username == claims.sub)
}

fn base64_url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

async fn revoke(State(e): State<Arc<Emulator>>, body: Bytes) -> Response {
    revoke_token(&e, form(&body).get("token"))
}

async fn revoke_get(
    State(e): State<Arc<Emulator>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    revoke_token(&e, q.get("token"))
}

fn revoke_token(e: &Emulator, token: Option<&String>) -> Response {
    match token {
        Some(t) if e.revoke(t) => StatusCode::OK.into_response(),
        _ => oauth_error("unsupported_token_type", "this token type is not supported"),
    }
}

/// The text between `<…name>` and `</…name>`, whatever the namespace prefix.
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open_end = xml.find(&format!("{name}>"))? + name.len() + 1;
    let rest = &xml[open_end..];
    let close = rest.find("</")?;
    Some(
        rest[..close]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn soap_login(
    State(e): State<Arc<Emulator>>,
    Path(version): Path<String>,
    body: Bytes,
) -> Response {
    let xml = String::from_utf8_lossy(&body);
    let user = match (xml_field(&xml, "username"), xml_field(&xml, "password")) {
        (Some(username), Some(password)) => e.config.users.iter().position(|u| {
            u.username == username && password == format!("{}{}", u.password, u.security_token)
        }),
        _ => None,
    };
    let soap = |status: StatusCode, inner: String| {
        let body = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns="urn:partner.soap.sforce.com" xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
        );
        let mut r = (status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/xml;charset=UTF-8"),
        );
        r
    };
    let Some(user) = user else {
        return soap(
            StatusCode::INTERNAL_SERVER_ERROR,
            // As Salesforce: `sf:`-prefixed fault code and a `LoginFault` detail, which clients
            // such as simple-salesforce read (`sf:exceptionCode`).
            "<soapenv:Fault><faultcode>sf:INVALID_LOGIN</faultcode><faultstring>INVALID_LOGIN: Invalid username, password, security token; or user locked out.</faultstring><detail><sf:LoginFault xsi:type=\"sf:LoginFault\"><sf:exceptionCode>INVALID_LOGIN</sf:exceptionCode><sf:exceptionMessage>Invalid username, password, security token; or user locked out.</sf:exceptionMessage></sf:LoginFault></detail></soapenv:Fault>".into(),
        );
    };
    let token = e.issue(user);
    let u = &e.config.users[user];
    let base = e.instance_url();
    let org = &e.config.org_id;
    soap(
        StatusCode::OK,
        format!(
            "<loginResponse><result><metadataServerUrl>{base}/services/Soap/m/{version}/{org}</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>false</sandbox><serverUrl>{base}/services/Soap/u/{version}/{org}</serverUrl><sessionId>{}</sessionId><userId>{}</userId><userInfo><organizationId>{org}</organizationId><userId>{}</userId><userName>{}</userName></userInfo></result></loginResponse>",
            xml_escape(&token),
            u.user_id,
            u.user_id,
            xml_escape(&u.username)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_std(b"hello"), "aGVsbG8=");
        assert_eq!(base64_url_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(random_alnum(10).len(), 10);
    }

    #[test]
    fn xml_fields_ignore_prefixes() {
        let xml = "<n1:login><n1:username>a@b.c</n1:username><n1:password>p&amp;w</n1:password></n1:login>";
        assert_eq!(xml_field(xml, "username").as_deref(), Some("a@b.c"));
        assert_eq!(xml_field(xml, "password").as_deref(), Some("p&w"));
    }
}
