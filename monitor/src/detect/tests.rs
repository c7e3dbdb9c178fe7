//! Detections on whole exchanges: each family on positive and negative cases, and
//! the scoring and per-rule controls.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::*;
use crate::http::{
    Problem,
    parse::{ParseErrorKind, Side, request_head},
    route::Routes,
};

const CLIENT: &str = "192.0.2.10:40000";

fn detections(toml_text: &str) -> Detections {
    let doc: DetectionsDoc = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"));
    Detections::new(&doc).unwrap_or_else(|e| panic!("{e}"))
}

/// An exchange from a raw request (`\n` line ends, body after a blank line).
fn exchange_from(client: &str, raw: &str, status: Option<u16>) -> Exchange {
    let raw = raw.replace('\n', "\r\n");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let head = request_head(&format!("{head}\r\n\r\n"));
    let route = Routes::new(&["/users/{id}".into(), "/users".into()]).template(head.target());
    Exchange {
        client: client.parse().unwrap(),
        server: "10.0.0.1:8080".parse().unwrap(),
        request: head,
        route: route.into(),
        started_ns: 1_000,
        request_body_bytes: body.len() as u64,
        request_body_complete: true,
        request_body: body.as_bytes().to_vec(),
        status,
        response_body_bytes: 0,
        latency: None,
    }
}

fn exchange(raw: &str) -> Exchange {
    exchange_from(CLIENT, raw, Some(200))
}

fn ids(report: &Report) -> Vec<&'static str> {
    report.findings.iter().map(|f| f.rule.id).collect()
}

fn inspect(d: &Detections, raw: &str) -> Vec<&'static str> {
    ids(&d.inspect(&exchange(raw), &mut State::default(), SystemTime::now()))
}

#[test]
fn injection_in_each_place_of_a_request() {
    let d = detections("");
    assert_eq!(
        inspect(
            &d,
            "GET /search?q=1%27%20OR%20%271%27=%271 HTTP/1.1\nHost: a\n\n"
        ),
        ["sqli", "anomaly-score"]
    );
    assert_eq!(
        inspect(
            &d,
            "GET /files/..%252f..%252fetc%252fpasswd HTTP/1.1\nHost: a\n\n"
        )[..2],
        ["path-traversal", "file-inclusion"]
    );
    assert_eq!(
        inspect(
            &d,
            "POST /c HTTP/1.1\nHost: a\nContent-Type: application/x-www-form-urlencoded\nContent-Length: 40\n\nname=bob&text=%3Cscript%3Ealert(1)%3C/script%3E"
        ),
        ["xss", "anomaly-score"]
    );
    assert_eq!(
        inspect(
            &d,
            "POST /c HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"a\":{\"b\":[\"x\",\"; cat /etc/passwd\"]}}"
        ),
        ["file-inclusion", "command-injection", "anomaly-score"]
    );
    assert_eq!(
        inspect(
            &d,
            "GET / HTTP/1.1\nHost: a\nCookie: theme=dark; pref=%27%20UNION%20SELECT%20password%20FROM%20users--\n\n"
        ),
        ["sqli", "anomaly-score"]
    );
    assert_eq!(
        inspect(
            &d,
            "POST /login HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"user\":\"a\",\"password\":{\"$ne\":null}}"
        ),
        ["nosql-injection", "anomaly-score"]
    );
    assert_eq!(
        inspect(
            &d,
            "POST /hooks HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"webhook_url\":\"http://[::ffff:a9fe:a9fe]/latest\"}"
        ),
        ["ssrf-cloud-metadata", "anomaly-score"]
    );
}

#[test]
fn ordinary_requests_find_nothing() {
    let d = detections("");
    for raw in [
        "GET /users/42?fields=name,email&sort=-created HTTP/1.1\nHost: api\nUser-Agent: Mozilla/5.0\n\n",
        "POST /users HTTP/1.1\nHost: api\nContent-Type: application/json\n\n{\"name\":\"Conan O'Brien\",\"bio\":\"<b>hi</b> -- it's me\",\"site\":\"https://example.com\"}",
        "POST /c HTTP/1.1\nHost: a\nContent-Type: application/x-www-form-urlencoded\n\nq=rock+%27n%27+roll&price=%245+*+3",
        "GET /search?q=%22select%22+AND+%22union%22 HTTP/1.1\nHost: a\n\n",
        "GET /a HTTP/1.0\n\n",
    ] {
        assert_eq!(inspect(&d, raw), Vec::<&str>::new(), "{raw}");
    }
}

#[test]
fn protocol_abuse_in_heads_and_in_refused_bytes() {
    let d = detections("[limits]\nmax_uri_bytes = 64\nmax_headers = 3");
    assert_eq!(
        inspect(
            &d,
            "POST / HTTP/1.1\nHost: a\nContent-Length: 4\nTransfer-Encoding: chunked\n\n0\n\n"
        ),
        ["http-smuggling", "anomaly-score"]
    );
    assert_eq!(
        inspect(
            &d,
            "POST / HTTP/1.1\nHost: a\nContent-Length: 2\nContent-Length: 2\n\nab"
        )[0],
        "http-content-length"
    );
    assert_eq!(
        inspect(&d, "GET / HTTP/1.1\nUser-Agent: x\n\n"),
        ["http-missing-host"]
    );
    assert_eq!(
        inspect(&d, "BREW /pot HTTP/1.1\nHost: a\n\n"),
        ["http-method"]
    );
    let long = format!("GET /{} HTTP/1.1\nHost: a\n\n", "a".repeat(80));
    assert_eq!(inspect(&d, &long), ["oversize-uri"]);
    assert_eq!(
        inspect(&d, "GET / HTTP/1.1\nHost: a\nA: 1\nB: 2\nC: 3\n\n"),
        ["oversize-headers"]
    );

    let problem = |kind, side| Problem {
        kind,
        side,
        client: CLIENT.parse::<SocketAddr>().unwrap(),
        server: "10.0.0.1:80".parse().unwrap(),
    };
    let rules = |p| ids(&d.inspect_problem(&p));
    assert_eq!(
        rules(problem(ParseErrorKind::ObsFold, Side::Request)),
        ["http-obs-fold"]
    );
    assert_eq!(
        rules(problem(ParseErrorKind::InvalidContentLength, Side::Request)),
        ["http-content-length", "anomaly-score"]
    );
    assert_eq!(
        rules(problem(ParseErrorKind::InvalidChunk, Side::Request)),
        ["http-chunking"]
    );
    assert_eq!(
        rules(problem(ParseErrorKind::InvalidVersion, Side::Request)),
        ["http-version"]
    );
    assert!(
        rules(problem(ParseErrorKind::InvalidChunk, Side::Response)).is_empty(),
        "servers are not judged"
    );
    assert!(
        rules(problem(ParseErrorKind::Gap, Side::Request)).is_empty(),
        "lost bytes are ours"
    );
}

fn hs256(claims: serde_json::Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn with_bearer(d: &Detections, token: &str) -> Vec<&'static str> {
    inspect(
        d,
        &format!("GET /api/me HTTP/1.1\nHost: a\nAuthorization: Bearer {token}\n\n"),
    )
}

#[test]
fn jwt_problems_without_keys() {
    let d = detections("");
    let valid = hs256(
        serde_json::json!({"sub": "alice", "exp": now_s() + 600}),
        b"k",
    );
    assert_eq!(
        with_bearer(&d, &valid),
        Vec::<&str>::new(),
        "no keys: the signature is not judged"
    );
    let expired = hs256(
        serde_json::json!({"sub": "alice", "exp": now_s() - 3600}),
        b"k",
    );
    assert_eq!(with_bearer(&d, &expired), ["jwt-expired"]);
    let early = hs256(
        serde_json::json!({"sub": "alice", "nbf": now_s() + 3600}),
        b"k",
    );
    assert_eq!(with_bearer(&d, &early), ["jwt-not-yet-valid"]);
    // {"alg":"none"} . {"sub":"admin"} . (no signature)
    assert_eq!(
        with_bearer(&d, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."),
        ["jwt-alg-none", "anomaly-score"]
    );
    assert_eq!(
        with_bearer(&d, "eyJhbGciOiJIUzI1NiJ9.not-base64!.x"),
        ["jwt-malformed"]
    );
    assert_eq!(
        with_bearer(&d, "eyJhbGciOiJIUzI1NiJ9.e30"),
        ["jwt-malformed"]
    );
}

#[test]
fn jwt_signatures_with_an_hs256_secret_and_a_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let d = detections(&format!("[auth]\njwt_secret_file = {:?}", secret));
    let claims = serde_json::json!({"sub": "alice", "exp": now_s() + 600});
    assert_eq!(
        with_bearer(&d, &hs256(claims.clone(), b"s3cret")),
        Vec::<&str>::new()
    );
    assert_eq!(
        with_bearer(&d, &hs256(claims.clone(), b"guess")),
        ["jwt-signature", "anomaly-score"]
    );

    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/detect/testdata");
    let d = detections(&format!(
        "[auth]\njwks_file = {:?}",
        testdata.join("jwks.json")
    ));
    let pem = std::fs::read(testdata.join("es256-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-es256".into());
    let signed =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap();
    assert_eq!(with_bearer(&d, &signed), Vec::<&str>::new());
    let mut tampered = signed.clone();
    tampered.replace_range(signed.len() - 6.., "AAAAAA");
    assert_eq!(
        with_bearer(&d, &tampered),
        ["jwt-signature", "anomaly-score"]
    );
    // RS256 from the same JWKS, chosen by kid.
    let pem = std::fs::read(testdata.join("rs256-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-rs256".into());
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    let signed = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_eq!(with_bearer(&d, &signed), Vec::<&str>::new());
    header.kid = Some("test-es256".into());
    let wrong_kid = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_eq!(
        with_bearer(&d, &wrong_kid),
        ["jwt-signature", "anomaly-score"],
        "an RSA signature checked with the EC key"
    );
    header.kid = Some("unknown".into());
    let unknown_kid = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_eq!(
        with_bearer(&d, &unknown_kid),
        ["jwt-signature", "anomaly-score"]
    );
    assert_eq!(
        with_bearer(&d, &hs256(claims, b"public key as HMAC secret")),
        ["jwt-signature", "anomaly-score"],
        "alg confusion: HS256 where keys are public"
    );
    assert!(matches!(
        Detections::new(&toml::from_str("[auth]\njwks_file = \"/nonexistent/jwks.json\"").unwrap()),
        Err(DetectError::Read { .. })
    ));
}

#[test]
fn credentials_required_in_query_and_over_cleartext() {
    let d = detections("[auth]\nrequired = [\"/api/**\"]\ncredential_headers = [\"x-api-key\"]");
    assert_eq!(
        inspect(&d, "GET /api/orders HTTP/1.1\nHost: a\n\n"),
        ["auth-missing"]
    );
    assert!(inspect(&d, "GET /api/orders HTTP/1.1\nHost: a\nX-Api-Key: k\n\n").is_empty());
    assert!(inspect(&d, "GET /public HTTP/1.1\nHost: a\n\n").is_empty());
    assert_eq!(
        inspect(&d, "GET /public?api_key=abc123 HTTP/1.1\nHost: a\n\n"),
        ["auth-credentials-in-query"]
    );
    assert!(
        inspect(
            &d,
            "GET /f?X-Amz-Signature=ab12&sig=cd HTTP/1.1\nHost: a\n\n"
        )
        .is_empty(),
        "presigned URLs"
    );
    // Cleartext credentials: paranoia 2, or the rule switched on.
    let basic = "GET /api/x HTTP/1.1\nHost: a\nAuthorization: Basic YTpi\n\n";
    assert!(inspect(&d, basic).is_empty());
    assert_eq!(
        inspect(&detections("paranoia = 2"), basic),
        ["auth-cleartext"]
    );
    assert_eq!(
        inspect(&detections("[rules.auth-cleartext]\nmode = \"on\""), basic),
        ["auth-cleartext"]
    );
}

#[test]
fn json_schema_and_content_type_per_route() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("user.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","required":["name"],"additionalProperties":false,
            "properties":{"name":{"type":"string","maxLength":20},"age":{"type":"integer","minimum":0}}}"#,
    )
    .unwrap();
    let d = detections(&format!(
        "[[schemas]]\nroute = \"/users\"\nfile = {schema:?}"
    ));
    let post = |body: &str, content_type: &str| {
        inspect(
            &d,
            &format!("POST /users HTTP/1.1\nHost: a\nContent-Type: {content_type}\n\n{body}"),
        )
    };
    assert!(post(r#"{"name":"ann","age":3}"#, "application/json").is_empty());
    assert_eq!(
        post(r#"{"name":"ann","age":-1}"#, "application/json"),
        ["schema-violation"]
    );
    assert_eq!(
        post(r#"{"name":"ann","role":"admin"}"#, "application/json"),
        ["schema-violation"],
        "mass assignment"
    );
    assert_eq!(post(r#"{"name":"ann"}"#, "text/plain"), ["content-type"]);
    assert_eq!(
        post(r#"{"name": "ann""#, "application/json"),
        ["json-malformed"]
    );
    let report = d.inspect(
        &exchange("POST /users HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"name\":\"secret-value-here\",\"age\":\"x\"}"),
        &mut State::default(),
        SystemTime::now(),
    );
    let evidence = &report.findings[0].evidence;
    assert!(
        evidence.contains("/age") && !evidence.contains("secret-value"),
        "values are masked: {evidence}"
    );
    assert!(matches!(
        Detections::new(
            &toml::from_str(&format!(
                "[[schemas]]\nroute = \"/u\"\nfile = {:?}",
                dir.path().join("missing.json")
            ))
            .unwrap()
        ),
        Err(DetectError::Read { .. })
    ));
}

const OPENAPI: &str = r##"
openapi: 3.0.3
info: {title: shop, version: "1"}
servers: [{url: "https://api.example.com/v1"}]
paths:
  /items:
    get:
      parameters:
        - {name: limit, in: query, schema: {type: integer, maximum: 100}}
        - {name: q, in: query, required: true, schema: {type: string}}
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Item"}
  /items/{itemId}:
    parameters:
      - {name: itemId, in: path, required: true, schema: {type: integer}}
    get: {}
    delete: {}
components:
  schemas:
    Item:
      type: object
      required: [name, price]
      properties:
        name: {type: string}
        price: {type: number, minimum: 0}
"##;

#[test]
fn openapi_routes_methods_parameters_and_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("openapi.yaml");
    std::fs::write(&spec, OPENAPI).unwrap();
    let d = detections(&format!("openapi = {spec:?}"));
    assert_eq!(d.route_templates(), ["/v1/items", "/v1/items/{itemId}"]);
    let get = |target: &str| inspect(&d, &format!("GET {target} HTTP/1.1\nHost: a\n\n"));
    assert!(get("/v1/items?q=lamp&limit=20").is_empty());
    assert!(get("/v1/items/42").is_empty());
    assert_eq!(get("/v1/items?q=lamp&limit=500"), ["openapi-parameter"]);
    assert_eq!(
        get("/v1/items?limit=5"),
        ["openapi-parameter"],
        "required q missing"
    );
    assert_eq!(get("/v1/items/abc"), ["openapi-parameter"]);
    assert_eq!(get("/v1/admin"), ["openapi-unknown-route"]);
    assert_eq!(
        inspect(&d, "PUT /v1/items/42 HTTP/1.1\nHost: a\n\n"),
        ["openapi-method"]
    );
    let post = |body: &str| {
        inspect(
            &d,
            &format!("POST /v1/items HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{body}"),
        )
    };
    assert!(post(r#"{"name":"lamp","price":9.5}"#).is_empty());
    assert_eq!(
        post(r#"{"name":"lamp","price":-1}"#),
        ["schema-violation"],
        "through $ref"
    );
    assert_eq!(post(""), ["schema-violation"], "required body");
    // Announced but never seen (the connection ended first): no verdict on its body.
    let mut cut = exchange(
        "POST /v1/items HTTP/1.1\nHost: a\nContent-Type: application/json\nContent-Length: 40\n\n",
    );
    cut.request_body_bytes = 0;
    cut.request_body_complete = false;
    let report = d.inspect(&cut, &mut State::default(), SystemTime::now());
    assert!(report.findings.is_empty(), "{:?}", ids(&report));
    std::fs::write(&spec, "openapi: 2.0\npaths: {}").unwrap();
    assert!(Detections::new(&toml::from_str(&format!("openapi = {spec:?}")).unwrap()).is_err());
}

#[test]
fn behaviour_over_a_window() {
    let d = detections(
        "[behaviour]\nenumeration_ids = 5\nfailed_logins = 3\nnot_found = 4\nadmin_routes = [\"/admin/**\"]\nadmin_sources = [\"10.0.0.0/8\"]",
    );
    let mut state = State::default();
    let mut run = |client: &str, raw: &str, status| {
        ids(&d.inspect(
            &exchange_from(client, raw, Some(status)),
            &mut state,
            SystemTime::now(),
        ))
    };
    let mut found = Vec::new();
    for id in 1..=6 {
        found.extend(run(
            CLIENT,
            &format!("GET /users/{id} HTTP/1.1\nHost: a\n\n"),
            200,
        ));
    }
    assert_eq!(
        found,
        ["bola-enumeration"],
        "once, at the fifth distinct id"
    );
    assert!(
        run("192.0.2.99:1", "GET /users/1 HTTP/1.1\nHost: a\n\n", 200).is_empty(),
        "per client"
    );

    // Failed logins from three addresses of one /64.
    let mut found = Vec::new();
    for host in 1..=3 {
        found.extend(run(
            &format!("[2001:db8:1:2::{host}]:5000"),
            "POST /login HTTP/1.1\nHost: a\n\n",
            401,
        ));
    }
    assert_eq!(found, ["auth-brute-force"]);
    let mut found = Vec::new();
    for _ in 0..4 {
        found.extend(run(
            "198.51.100.7:1",
            "GET /nope HTTP/1.1\nHost: a\n\n",
            404,
        ));
    }
    assert_eq!(found, ["scanner-404-burst"]);
    assert_eq!(
        run(
            CLIENT,
            "GET / HTTP/1.1\nHost: a\nUser-Agent: sqlmap/1.7\n\n",
            200
        ),
        ["scanner-user-agent"]
    );
    assert_eq!(
        run(CLIENT, "GET /admin/users HTTP/1.1\nHost: a\n\n", 200),
        ["bfla-admin-route", "anomaly-score"]
    );
    assert!(run("10.1.2.3:1", "GET /admin/users HTTP/1.1\nHost: a\n\n", 200).is_empty());
    assert_eq!(
        run(CLIENT, "GET /items?limit=100000 HTTP/1.1\nHost: a\n\n", 200),
        ["resource-unbounded-page"]
    );
}

#[test]
fn admin_subjects_count_only_from_tokens_the_keys_verify() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let behaviour = "[behaviour]\nadmin_routes = [\"/admin/**\"]\nadmin_subjects = [\"alice\"]";
    let alice = serde_json::json!({"sub": "alice", "exp": now_s() + 600});
    let admin = |d: &Detections, token: &str| {
        inspect(
            d,
            &format!("GET /admin/users HTTP/1.1\nHost: a\nAuthorization: Bearer {token}\n\n"),
        )
    };
    let d = detections(&format!(
        "[auth]\njwt_secret_file = {secret:?}\n{behaviour}"
    ));
    assert!(admin(&d, &hs256(alice.clone(), b"s3cret")).is_empty());
    assert_eq!(
        admin(&d, &hs256(alice.clone(), b"guess")),
        ["bfla-admin-route", "jwt-signature", "anomaly-score"]
    );
    let bob = serde_json::json!({"sub": "bob", "exp": now_s() + 600});
    assert_eq!(
        admin(&d, &hs256(bob, b"s3cret")),
        ["bfla-admin-route", "anomaly-score"]
    );
    // Without keys nothing verifies: a subject is the sender's to choose.
    let d = detections(behaviour);
    assert_eq!(
        admin(&d, &hs256(alice, b"s3cret")),
        ["bfla-admin-route", "anomaly-score"]
    );
}

#[test]
fn controls_switch_off_dry_run_act_and_tune_per_route() {
    let sqli = "GET /search?q=1%27%20OR%201=1-- HTTP/1.1\nHost: a\n\n";
    assert!(inspect(&detections("enabled = false"), sqli).is_empty());
    assert!(inspect(&detections("[rules.sqli]\nmode = \"off\""), sqli).is_empty());
    let d = detections("[rules.sqli]\nmode = \"dry_run\"");
    let report = d.inspect(&exchange(sqli), &mut State::default(), SystemTime::now());
    assert_eq!(ids(&report), ["sqli"], "dry run: reported, not scored");
    assert!(report.findings[0].dry_run && report.score == 0);
    let d = detections("[rules.sqli]\naction = \"block\"\nttl = \"1h\"");
    let report = d.inspect(&exchange(sqli), &mut State::default(), SystemTime::now());
    assert_eq!(report.findings[0].action, Some(ActionKind::Block));
    assert_eq!(
        d.settings(report.findings[0].rule.id)
            .and_then(|s| s.ttl.as_ref())
            .map(|t| t.0),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        report.findings[1].action,
        Some(ActionKind::Alert),
        "anomaly action by default"
    );
    let d = detections("[[routes]]\nroute = \"/search\"\noff = [\"sqli\"]");
    assert!(inspect(&d, sqli).is_empty());
    assert_eq!(
        inspect(&d, &sqli.replace("/search", "/other")),
        ["sqli", "anomaly-score"]
    );
    // Threshold: one warning (3) stays under 5.
    assert_eq!(
        inspect(&detections(""), "BREW / HTTP/1.1\nHost: a\n\n"),
        ["http-method"]
    );
    assert_eq!(
        inspect(
            &detections("anomaly_threshold = 3"),
            "BREW / HTTP/1.1\nHost: a\n\n"
        ),
        ["http-method", "anomaly-score"]
    );
    // Paranoia 2 adds the single-level traversal rule.
    let custom = "GET / HTTP/1.1\nHost: a\nX-Tenant: 1' OR '1'='1\n\n";
    assert!(
        inspect(&detections(""), custom).is_empty(),
        "paranoia 1: the usual headers"
    );
    assert_eq!(
        inspect(&detections("paranoia = 2"), custom),
        ["sqli", "anomaly-score"]
    );
    let relative = "GET /f?path=../notes.txt HTTP/1.1\nHost: a\n\n";
    assert!(inspect(&detections(""), relative).is_empty());
    assert_eq!(
        inspect(&detections("paranoia = 2"), relative),
        ["path-traversal-relative"]
    );
}

#[test]
fn bad_settings_are_refused_with_their_place() {
    let refused = |text: &str| match Detections::new(&toml::from_str(text).unwrap()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{text} was accepted"),
    };
    assert!(
        refused("[rules.sqlinjection]\nmode = \"off\"")
            .contains("unknown detection rule \"sqlinjection\" (known: sqli, xss")
    );
    assert!(refused("paranoia = 5").contains("paranoia"));
    assert!(refused("anomaly_threshold = 0").contains("anomaly_threshold"));
    assert!(refused("[rules.xss]\naction = \"throttle\"").contains("throttle_pps"));
    assert!(refused("[[routes]]\nroute = \"/a\"\noff = [\"nope\"]").contains("nope"));
    assert!(refused("[auth]\nrequired = [\"/a/[\"]").contains("detections.auth.required"));
    assert!(toml::from_str::<DetectionsDoc>("[rules.sqli]\nmode = \"sometimes\"").is_err());
}

#[test]
fn secrets_stay_secret_in_findings() {
    let d = detections("");
    let report = d.inspect(
        &exchange("GET / HTTP/1.1\nHost: a\nCookie: session=%27%20OR%201=1--\n\n"),
        &mut State::default(),
        SystemTime::now(),
    );
    assert!(report.findings[0].secret, "cookie values are credentials");
    let report = d.inspect(
        &exchange("GET /x?password=%27%20OR%201=1-- HTTP/1.1\nHost: a\n\n"),
        &mut State::default(),
        SystemTime::now(),
    );
    assert!(
        report
            .findings
            .iter()
            .all(|f| f.secret || f.rule.id == "anomaly-score")
    );
}

#[test]
fn evasions_found_in_review_are_closed() {
    let d = detections("");
    // A raw path that climbs (clients like curl would have resolved it).
    let found = inspect(&d, "GET /files/..%2f..%2fetc/passwd HTTP/1.1\nHost: a\n\n");
    assert!(
        found.contains(&"path-traversal") && found.contains(&"file-inclusion"),
        "{found:?}"
    );
    assert!(
        inspect(
            &d,
            "GET /static/..;/..;/WEB-INF/web.xml HTTP/1.1\nHost: a\n\n"
        )
        .contains(&"path-traversal")
    );
    // Padding with parameters does not hide a payload in the body.
    let padding = (0..300)
        .map(|i| format!("p{i}=1"))
        .collect::<Vec<_>>()
        .join("&");
    let found = inspect(
        &d,
        &format!(
            "POST /c?{padding} HTTP/1.1\nHost: a\nContent-Type: application/x-www-form-urlencoded\n\nq=%3Cscript%3Ealert(1)%3C/script%3E"
        ),
    );
    assert!(
        found.contains(&"xss") && found.contains(&"inspection-limit"),
        "{found:?}"
    );
    // A second Authorization header is checked too.
    let valid = hs256(serde_json::json!({"sub": "a", "exp": now_s() + 600}), b"k");
    let found = inspect(
        &d,
        &format!(
            "GET / HTTP/1.1\nHost: a\nAuthorization: Bearer {valid}\nAuthorization: Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.\n\n"
        ),
    );
    assert!(found.contains(&"jwt-alg-none"), "{found:?}");
    // An algorithm jsonwebtoken does not know is no signature problem without keys.
    let es512 = "eyJhbGciOiJFUzUxMiJ9.eyJzdWIiOiJhIn0.c2ln";
    assert_eq!(with_bearer(&d, es512), Vec::<&str>::new());
}

#[test]
fn ordinary_traffic_found_in_review_passes() {
    let d = detections("");
    for raw in [
        "GET /api/items?fields=name;id&sort=name|id&tags=dogs;cat HTTP/1.1\nHost: a\n\n",
        "GET /img?site_id=1234&image_scale=0.75&next=1000 HTTP/1.1\nHost: a\n\n",
        "GET /shop?key=theme&size=2000&max=500 HTTP/1.1\nHost: a\n\n",
        "GET / HTTP/1.1\nHost: a\nUser-Agent: Mozilla/5.0 (Windows NT 6.3; Trident/7.0; Touch; rv:11.0) like Gecko\n\n",
        "POST /upload HTTP/1.1\nHost: a\nContent-Type: image/png\n\n\u{89}PNG ../../ \u{fffd}..",
        "POST /bulk HTTP/1.1\nHost: a\nContent-Type: application/x-ndjson\n\n{\"index\":{}}\n{\"a\":1}\n",
        "POST /orders HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"$type\":\"Shop.Order, Shop\",\"id\":3}",
    ] {
        assert_eq!(inspect(&d, raw), Vec::<&str>::new(), "{raw}");
    }
}

#[test]
fn credentials_in_any_spelling_are_fingerprinted() {
    let d = detections("");
    for raw in [
        "POST /u HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"user\":{\"password\":\"' OR 1=1--\"}}",
        "POST /u HTTP/1.1\nHost: a\nContent-Type: application/json\n\n{\"newPassword\":\"' OR 1=1--\"}",
        "GET /x?accessToken=%27%20OR%201=1-- HTTP/1.1\nHost: a\n\n",
    ] {
        let report = d.inspect(&exchange(raw), &mut State::default(), SystemTime::now());
        let sqli = report
            .findings
            .iter()
            .find(|f| f.rule.id == "sqli")
            .unwrap();
        assert!(sqli.secret, "{raw}");
    }
}

#[test]
fn settings_that_cannot_work_are_refused() {
    let refused = |text: &str| Detections::new(&toml::from_str(text).unwrap()).is_err();
    assert!(refused("anomaly_action = \"throttle\""));
    assert!(!refused(
        "anomaly_action = \"throttle\"\n[rules.anomaly-score]\nthrottle_pps = 10"
    ));
    assert!(refused("[behaviour]\nfailed_logins = 0"));
}

#[test]
fn openapi_leaves_preflights_heads_arrays_and_nulls_alone() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("openapi.json");
    std::fs::write(
        &spec,
        serde_json::json!({
            "openapi": "3.0.3",
            "paths": {
                "/things": {
                    "get": {"parameters": [{"name": "tags", "in": "query", "schema": {"type": "array", "items": {"type": "integer"}}}]},
                    "post": {"requestBody": {"content": {
                        "application/*": {"schema": {"type": "object"}},
                        "application/json": {"schema": {"type": "object", "properties": {"note": {"type": "string", "nullable": true}}}}
                    }}}
                }
            }
        })
        .to_string(),
    )
    .unwrap();
    let d = detections(&format!("openapi = {spec:?}"));
    assert!(inspect(&d, "OPTIONS /things HTTP/1.1\nHost: a\n\n").is_empty());
    assert!(inspect(&d, "HEAD /things HTTP/1.1\nHost: a\n\n").is_empty());
    assert!(inspect(&d, "GET /things?tags=1,2,3 HTTP/1.1\nHost: a\n\n").is_empty());
    assert_eq!(
        inspect(&d, "GET /things?tags=1,x HTTP/1.1\nHost: a\n\n"),
        ["openapi-parameter"]
    );
    let post = |content_type: &str, body: &str| {
        inspect(
            &d,
            &format!("POST /things HTTP/1.1\nHost: a\nContent-Type: {content_type}\n\n{body}"),
        )
    };
    assert!(
        post("application/json", "{\"note\":null}").is_empty(),
        "nullable"
    );
    assert!(post("application/xml", "<a/>").is_empty(), "application/*");
    assert_eq!(post("text/csv", "a,b"), ["content-type"]);
}

/// Mangled requests of every shape through every detector at the highest paranoia:
/// findings or none, never a panic.
#[test]
fn mangled_requests_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("openapi.yaml");
    std::fs::write(&spec, OPENAPI).unwrap();
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/detect/testdata");
    let d = detections(&format!(
        "paranoia = 4\nopenapi = {spec:?}\n[auth]\nrequired = [\"/**\"]\njwks_file = {:?}\n[behaviour]\nadmin_routes = [\"/admin/**\"]",
        testdata.join("jwks.json")
    ));
    let seeds: &[&[u8]] = &[
        b"GET /v1/items/1?q=%27%20or%201=1&limit=5 HTTP/1.1\r\nHost: a\r\nCookie: a=b; c\r\nAuthorization: Bearer eyJhbGciOiJFUzI1NiJ9.e30.x\r\n\r\n",
        b"POST /v1/items HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\r\n{\"name\":\"<script>\",\"price\":{\"$gt\":1},\"u\":\"http://[::1]\"}",
        b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\na=%&b=%zz&c=%c0%ae%c0%ae/&d=&#x;&#99999999;\\u12",
    ];
    let mut state = State::default();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const NOISE: &[u8] = b"%&=;?#/\\.<>'\"{}[]$`|\x00\xff\xc0\xaeaZ09 \r\n:eyJ@";
    let mut inspected = 0;
    for _ in 0..1500 {
        let mut bytes = seeds[next() as usize % seeds.len()].to_vec();
        for _ in 0..(next() % 8) {
            let at = next() as usize % (bytes.len() + 1);
            match next() % 3 {
                0 => bytes.insert(at, NOISE[next() as usize % NOISE.len()]),
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at.max(20)),
            }
        }
        let head_end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4);
        let Some(head_end) = head_end else { continue };
        let crate::http::parse::HeadParse::Complete(head, _) =
            crate::http::parse::RequestHead::parse(&bytes[..head_end])
        else {
            continue;
        };
        let body = bytes[head_end..].to_vec();
        let route = Routes::new(&["/v1/items/{itemId}".into()]).template(head.target());
        let exchange = Exchange {
            client: CLIENT.parse().unwrap(),
            server: "10.0.0.1:80".parse().unwrap(),
            request: head,
            route: route.into(),
            started_ns: next() % 1_000_000_000,
            request_body_bytes: body.len() as u64 + next() % 2,
            request_body_complete: next() % 4 != 0,
            request_body: body,
            status: Some([200, 401, 404, 500][next() as usize % 4]),
            response_body_bytes: next() % 100_000_000,
            latency: None,
        };
        d.inspect(&exchange, &mut state, SystemTime::now());
        inspected += 1;
    }
    assert!(inspected > 500, "only {inspected} mangled requests parsed");
}
