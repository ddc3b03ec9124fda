//! Server-side apply of a CRD and of objects of it, re-applied with no change.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{CustomResource, CustomResourceExt, ResourceExt};
use mesh_testenv::{TestEnv, eventually};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A stand-in with the shape of our rate-limit policy, in a group of its own: the real
/// `ratelimitpolicies.policy.meshctl.io` is applied by `meshctl install` in other tests of
/// this shared environment, and two writers of one CRD make "no write" unprovable.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ssa-test.meshctl.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced
)]
#[serde(rename_all = "camelCase")]
struct RateLimitPolicySpec {
    target_refs: Vec<TargetRef>,
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct TargetRef {
    group: String,
    kind: String,
    name: String,
}

fn policy(name: &str, max_tokens: u32) -> RateLimitPolicy {
    RateLimitPolicy::new(
        name,
        RateLimitPolicySpec {
            target_refs: vec![TargetRef {
                group: "gateway.networking.k8s.io".into(),
                kind: "HTTPRoute".into(),
                name: "myapp".into(),
            }],
            max_tokens,
            tokens_per_fill: 5,
            fill_interval: "60s".into(),
        },
    )
}

#[tokio::test]
async fn server_side_apply_of_a_crd_and_its_objects_is_idempotent() {
    let env = TestEnv::shared();
    let client = env.client().unwrap();
    let ns = env.create_namespace("ssa").await.unwrap();
    let pp = PatchParams::apply("meshctl").force();

    // The CRD, applied twice: the second apply changes nothing.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = RateLimitPolicy::crd();
    let name = crd.name_any();
    let first = crds.patch(&name, &pp, &Patch::Apply(&crd)).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds.clone(), &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD Established within 30s")
    .unwrap();
    // The API server's own controllers write the CRD's status (names accepted,
    // established) just after the apply; wait until nothing writes for a second.
    let established = eventually(Duration::from_secs(30), "the CRD to settle", || async {
        let before = crds.get(&name).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = crds.get(&name).await?;
        Ok((before.resource_version() == after.resource_version()).then_some(after))
    })
    .await
    .unwrap();
    let again = crds.patch(&name, &pp, &Patch::Apply(&crd)).await.unwrap();
    assert_eq!(
        again.resource_version(),
        established.resource_version(),
        "re-applying the unchanged CRD is a no-op"
    );
    assert!(first.resource_version().is_some());

    // Objects of it.
    let policies: Api<RateLimitPolicy> = Api::namespaced(client, &ns);
    let objs = [policy("myapp", 10), policy("otherapp", 20)];
    let mut versions = Vec::new();
    for obj in &objs {
        // The new type may take a moment to be served after Established.
        let applied = eventually(
            Duration::from_secs(30),
            "the first apply of a RateLimitPolicy",
            || async {
                Ok(Some(
                    policies
                        .patch(&obj.name_any(), &pp, &Patch::Apply(obj))
                        .await?,
                ))
            },
        )
        .await
        .unwrap();
        assert_eq!(applied.spec, obj.spec);
        let managers: Vec<_> = applied
            .managed_fields()
            .iter()
            .map(|m| (m.manager.clone(), m.operation.clone()))
            .collect();
        assert_eq!(
            managers,
            [(Some("meshctl".to_owned()), Some("Apply".to_owned()))],
            "only meshctl's apply manages the fields"
        );
        versions.push(applied.resource_version().unwrap());
    }

    for (obj, rv) in objs.iter().zip(&versions) {
        let again = policies
            .patch(&obj.name_any(), &pp, &Patch::Apply(obj))
            .await
            .unwrap();
        assert_eq!(
            again.resource_version().as_ref(),
            Some(rv),
            "re-applying {} unchanged must not write",
            obj.name_any()
        );
    }

    // A real change does write (the check above is not vacuous).
    let changed = policies
        .patch("myapp", &pp, &Patch::Apply(&policy("myapp", 11)))
        .await
        .unwrap();
    assert_ne!(changed.resource_version().as_ref(), Some(&versions[0]));
    assert_eq!(changed.spec.max_tokens, 11);
}
