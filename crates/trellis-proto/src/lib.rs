//! Generated types for Trellis' wire contract. Nothing here but code generation:
//! conversions to domain types live at the edges that use them.

pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("trellis.discovery.v1");

        /// Type URLs of the resource kinds on the discovery stream.
        pub mod type_url {
            pub const SERVICE: &str = "type.trellis.io/Service";
            pub const ENDPOINTS: &str = "type.trellis.io/Endpoints";
            pub const TRUST_BUNDLE: &str = "type.trellis.io/TrustBundle";
            pub const ROUTE_TABLE: &str = "type.trellis.io/RouteTable";
            pub const TRAFFIC_POLICY: &str = "type.trellis.io/TrafficPolicy";
            pub const AUTHORIZATION_POLICY: &str = "type.trellis.io/AuthorizationPolicy";
            pub const PEER_AUTHENTICATION: &str = "type.trellis.io/PeerAuthentication";
        }
    }
}

pub mod ca {
    pub mod v1 {
        tonic::include_proto!("trellis.ca.v1");
    }
}
